"""`scr-export convert --to gguf`: the decoder as GGUF (quantized by llama.cpp), images through our ONNX encoder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from scr_export.errors import SCRExportError

from .gguf_vocab import check_tokenizer
from .gguf_writer import TEXT_ARCH, file_dtype, write_text_gguf
from .quantize import PRECISION_OF, QUANT_TYPES, quantize, tensor_types
from .quirks import quirks_for


def convert_to_gguf(model: str, out: str | Path, *, quant: str = "q8_0", config_overrides: dict[str, Any] | None = None,
                    force: bool = False, images: str = "auto", progress=print, validate: bool = True):
    """``images``: "mmproj" (llama.cpp's own projector via libmtmd), "onnx" (our exported vision encoder), or
    "auto" (mmproj where llama.cpp supports the family, else onnx)."""
    from scr_export.convert import (GRAPH_FILES, check_out_dir, host_graphs, manifest_common, not_validated,
                                    staged_directory, write_processing_files)
    from scr_export.sample import sample_image
    from scr_export.loading import load_vlm
    from scr_export.manifest import write_manifest
    from scr_export.onnx_export.vision import export_vision
    from scr_export.parity import validate_directory

    from graph_passes.io import load_model, save_model

    out = Path(out)
    if quant not in QUANT_TYPES:
        raise SCRExportError(f"--quant {quant} is not supported", f"use one of {', '.join(QUANT_TYPES)}")
    check_out_dir(out, force)
    t0 = time.perf_counter()
    progress(f"[1/5] reading {model} (structure only: the weights stream from the checkpoint as they are written)")
    fam = load_vlm(model, weights=False)
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
        # the token embeddings are the GGUF's own table (runtimes/llamacpp/token_table.py): no ONNX copy of it
        graph_keys = [] if use_mmproj else ["vision"]
        if use_mmproj:
            progress("[2/5] writing llama.cpp's mmproj (its converter)")
            write_mmproj(fam.path, tmp / "mmproj-f32.gguf", progress)
        else:
            progress("[2/5] exporting the vision encoder (ONNX, run by ONNX Runtime)")
            export_vision(fam, fam.process_images([sample_image()]), raw / GRAPH_FILES["vision"])
        for key in graph_keys:
            save_model(load_model(raw / GRAPH_FILES[key]), tmp / GRAPH_FILES[key])
        # the decoder in the checkpoint's float type (f16 stays f16: never an f32 copy of an f16 model), read one
        # tensor at a time; llama.cpp quantizes from that file (memory-mapped); --quant f32 writes f32 directly
        dtype = "float32" if quant == "f32" else file_dtype(fam)
        gguf_name = f"model-{quant}.gguf"
        written = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dtype]
        direct = written == quant
        progress(f"[3/5] writing the decoder as GGUF ({written}, streamed from the checkpoint)"
                 + ("" if direct else f" and quantizing to {quant} with llama.cpp"))
        src = tmp / gguf_name if direct else raw / f"model-{written}.gguf"
        info = write_text_gguf(fam, src, dtype=dtype)
        tokenizer_check = check_tokenizer(src, fam.tokenizer)
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
        if not direct:
            quantize(src, tmp / gguf_name, quant)
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
                     "tokenizer": {**tk, "check": tokenizer_check},
                     "token_embeddings": "the GGUF's token_embd.weight, rows dequantized as llama.cpp does"},
            "graphs": {k: v for k, v in host_graphs(fam).items() if k != "embed_tokens"},
            "parity": None,
        }
        if use_mmproj:
            del manifest["graphs"]["vision"]
        manifest["versions"]["llama_cpp_python"] = _llama_version()
        write_manifest(tmp, manifest)
        reports = None
        if validate:
            progress("[4/5] parity against the float PyTorch reference and the dequantized-weights reference")
            reports = validate_directory(tmp)  # the float32 reference loads here, after the weight-less exporter
            manifest["parity"] = {k: r.to_dict() for k, r in reports.items()}
        else:
            progress(f"[4/5] parity NOT checked (--no-validate): run `scr-export validate {out}` later")
            manifest["parity"] = not_validated()
        write_manifest(tmp, manifest)
    progress(f"[5/5] wrote {out} in {time.perf_counter() - t0:.1f}s")
    return out, reports


def _llama_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "unknown")
