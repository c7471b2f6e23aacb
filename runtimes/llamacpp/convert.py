"""`scr-export convert --to gguf`: the decoder as GGUF (quantized by llama.cpp), images through our ONNX encoder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from scr_export.errors import SCRExportError

from .gguf_vocab import check_tokenizer
from .gguf_writer import TEXT_ARCH, write_text_gguf
from .quantize import PRECISION_OF, QUANT_TYPES, quantize, tensor_types
from .quirks import quirks_for


def convert_to_gguf(model: str, out: str | Path, *, quant: str = "q8_0", config_overrides: dict[str, Any] | None = None,
                    force: bool = False, images: str = "auto", progress=print):
    """``images``: "mmproj" (llama.cpp's own projector via libmtmd), "onnx" (our exported vision encoder), or
    "auto" (mmproj where llama.cpp supports the family, else onnx)."""
    from scr_export.convert import (GRAPH_FILES, check_out_dir, host_graphs, manifest_common, staged_directory,
                                    write_processing_files)
    from scr_export.sample import sample_image
    from scr_export.loading import load_vlm
    from scr_export.manifest import write_manifest
    from scr_export.onnx_export.vision import export_embed_tokens, export_vision
    from scr_export.parity import validate_directory

    from graph_passes.io import load_model, save_model

    out = Path(out)
    if quant not in QUANT_TYPES:
        raise SCRExportError(f"--quant {quant} is not supported", f"use one of {', '.join(QUANT_TYPES)}")
    check_out_dir(out, force)
    t0 = time.perf_counter()
    progress(f"[1/5] loading {model}")
    fam = load_vlm(model)
    if fam.name not in TEXT_ARCH:
        raise SCRExportError(f"--to gguf does not support {fam.display_name} yet",
                             f"supported families: {', '.join(TEXT_ARCH)}; use --to onnx for the others")
    config = fam.scr_config(**(config_overrides or {}))
    from .mmproj import MMPROJ_FAMILIES, write_mmproj

    if images not in ("auto", "mmproj", "onnx"):
        raise SCRExportError(f"--images {images} is unknown", "use auto, mmproj or onnx")
    if images == "mmproj" and fam.name not in MMPROJ_FAMILIES:
        raise SCRExportError(f"llama.cpp's mmproj path is not supported here for {fam.display_name}",
                             f"use --images onnx (mmproj families: {', '.join(sorted(MMPROJ_FAMILIES))})")
    use_mmproj = images == "mmproj" or (images == "auto" and fam.name in MMPROJ_FAMILIES)
    with staged_directory(out) as tmp:
        raw = tmp / "raw"
        raw.mkdir()
        graph_keys = ["embed_tokens"] if use_mmproj else ["vision", "embed_tokens"]
        if use_mmproj:
            progress("[2/5] writing llama.cpp's mmproj (its converter) and the token embeddings (ONNX)")
            write_mmproj(fam.path, tmp / "mmproj-f32.gguf", progress)
        else:
            progress("[2/5] exporting the vision encoder and token embeddings (ONNX, run by ONNX Runtime)")
            export_vision(fam, fam.process_images([sample_image()]), raw / GRAPH_FILES["vision"])
        export_embed_tokens(fam, raw / GRAPH_FILES["embed_tokens"])
        for key in graph_keys:
            save_model(load_model(raw / GRAPH_FILES[key]), tmp / GRAPH_FILES[key])
        progress(f"[3/5] writing the decoder as GGUF (f32) and quantizing to {quant} with llama.cpp")
        f32 = raw / "model-f32.gguf"
        info = write_text_gguf(fam, f32)
        tokenizer_check = check_tokenizer(f32, fam.tokenizer)
        tk = info["tokenizer"]
        progress(f"      vocabulary: {tk['kind']}, llama.cpp model {tk['model']!r}, pre {tk['pre']!r}; llama.cpp "
                 f"tokenises {tokenizer_check['identical']}/{tokenizer_check['strings']} probe strings as the "
                 "checkpoint does")
        if tokenizer_check["first_mismatch"]:
            m = tokenizer_check["first_mismatch"]
            progress(f"      WARNING: llama.cpp's own tools would tokenise {m['text']!r} differently "
                     f"({m['llama_cpp']} vs {m['checkpoint']}); scr-export's runner is unaffected (it tokenises "
                     "with tokenizer.json)")
        for quirk in quirks_for(info["architecture"]):
            progress(f"      note: {quirk}; the float comparison will show it")
        gguf_name = f"model-{quant}.gguf"
        if quant == "f32":
            shutil.copyfile(f32, tmp / gguf_name)
        else:
            quantize(f32, tmp / gguf_name, quant)
        shutil.rmtree(raw)
        write_processing_files(fam, tmp)
        manifest = {
            **manifest_common(fam, model, config), "runtime": "llamacpp", "precision": PRECISION_OF[quant],
            "images": ("llama.cpp mmproj through libmtmd (its own image preprocessing and projector)" if use_mmproj
                       else "vision encoder exported to ONNX by scr-export, features fed to llama.cpp as embeddings"),
            "gguf": {"file": gguf_name, "quant": quant, "architecture": info["architecture"],
                     "qk_permuted": info["qk_permuted"], "tensor_types": tensor_types(tmp / gguf_name),
                     "n_head": fam.text_config.num_attention_heads, "n_ctx": 4096,
                     "kv_cache": "f32", "flash_attention": False,
                     "known_deviations": quirks_for(info["architecture"]),
                     "mmproj": "mmproj-f32.gguf" if use_mmproj else None,
                     "tokenizer": {**tk, "check": tokenizer_check}},
            "graphs": host_graphs(fam),
            "parity": None,
        }
        if use_mmproj:
            del manifest["graphs"]["vision"]
        manifest["versions"]["llama_cpp_python"] = _llama_version()
        write_manifest(tmp, manifest)
        progress("[4/5] parity against the float PyTorch reference and the dequantized-weights reference")
        reports = validate_directory(tmp, family=fam)
        manifest["parity"] = {k: r.to_dict() for k, r in reports.items()}
        write_manifest(tmp, manifest)
    progress(f"[5/5] wrote {out} in {time.perf_counter() - t0:.1f}s")
    return out, reports


def _llama_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "unknown")
