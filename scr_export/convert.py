"""`scr-export convert --to onnx`: export, rewrite with the SCR passes, write the artefact directory atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import SCRExportError
from .checkpoint import check_free_space
from .manifest import QUANTIZED, checkpoint_hash, write_manifest
from .sample import sample_image

Progress = Callable[[str], None]

GRAPH_FILES = {"vision": "vision_encoder.onnx", "embed_tokens": "embed_tokens.onnx",
               "diagnostic": "diagnostic.onnx", "decoder": "decoder_model_merged.onnx"}


def _stderr(msg: str) -> None:
    print(f"[scr-export] {msg}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"scr_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_processing_files(fam: Any, directory: Path) -> None:
    """What a runtime needs to go from an image file and a prompt to inputs: config, tokenizer, image processor."""
    import json

    fam.tokenizer.save_pretrained(directory)
    fam.image_processor.save_pretrained(directory)
    fam.config.save_pretrained(directory)
    if fam.processor_config:
        (directory / "processor_config.json").write_text(json.dumps(fam.processor_config, indent=2, sort_keys=True))


def manifest_common(fam: Any, model: str, config: Any) -> dict[str, Any]:
    """The manifest entries every runtime's directory shares."""
    from .hostproc.model import host_config
    from .onnx_export.decoder import kv_shape

    kv, head_dim = kv_shape(fam)
    return {
        "family": fam.name, "display_name": fam.display_name,
        "source": {"model": model, "preset": fam.preset, "path": str(fam.path), "sha256": checkpoint_hash(fam.path)},
        "versions": _versions(), "scr": config.to_dict(),
        "image_tokens": {"image_token_id": fam.image_token_id, "placeholder": fam.placeholder,
                         "prompt_template": fam.prompt_template, "grid_rule": fam.grid_rule},
        "decoder": {"num_layers": fam.num_layers, "kv_heads": kv, "head_dim": head_dim,
                    "hidden_size": fam.text_config.hidden_size, "mrope": fam.uses_mrope},
        "host": fam.host_settings(),  # the torch-free pre-processing's settings (scr_export.hostproc)
        "model_config": host_config(fam),  # the config numbers the family adapter reads on a run (hostproc.model)
    }


def host_graphs(fam: Any) -> dict[str, Any]:
    """Manifest entries of the graphs that turn images and tokens into embeddings on the host."""
    from .onnx_export.vision import vision_io

    vis_in, vis_out = vision_io(fam)
    return {"vision": {"file": GRAPH_FILES["vision"], "inputs": vis_in, "outputs": vis_out},
            "embed_tokens": {"file": GRAPH_FILES["embed_tokens"], "inputs": ["input_ids"],
                             "outputs": ["inputs_embeds"]}}


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` (unless ``force``) or a missing parent, before any work."""
    if out.exists() and not force:
        raise SCRExportError(f"{out} already exists", "choose another --out, or pass --force to replace it")
    if not out.parent.exists():
        raise SCRExportError(f"the directory {out.parent} does not exist", "create it or choose another --out")


@contextlib.contextmanager
def staged_directory(out: Path):
    """A private directory beside ``out`` to write into; on success it replaces ``out`` in one rename, on any error
    (Ctrl-C included) it is removed, so ``out`` is either complete or untouched."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the artefact is meant to be shared
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


GQA_FILE = "decoder_model_merged_gqa.onnx"
VISION_MHA_FILE = "vision_encoder_mha.onnx"


STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose cos/sin depend on the position only


def rotary_tables(fam, head_dim: int):
    """(cos, sin) ``[max_positions, head_dim / 2]`` from the model's own rotary module, for GroupQueryAttention's
    ``do_rotary``; None where the op cannot compute the model's rotary embedding (Qwen2-VL's M-RoPE, partial or
    interleaved rotary) or no rotary module is found."""
    import torch

    if fam.name == "qwen2_vl":
        return None  # 3-D positions: the op rotates by 1-D position
    rope = getattr(fam.text_config, "rope_parameters", None) or getattr(fam.text_config, "rope_scaling", None) or {}
    if (rope.get("rope_type") or rope.get("type") or "default") not in STATIC_ROPE:
        return None  # tables that depend on the sequence length (dynamic NTK, longrope) cannot be precomputed
    module = fam.model
    for part in fam.layers_path.split(".")[:-1]:
        module = getattr(module, part, None)
    rotary = getattr(module, "rotary_emb", None)
    positions = int(getattr(fam.text_config, "max_position_embeddings", 0) or 0)
    if rotary is None or positions <= 0:
        return None
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = head_dim // 2
    if cos.shape[-1] != head_dim or not (np.array_equal(cos[:, :half], cos[:, half:])
                                         and np.array_equal(sin[:, :half], sin[:, half:])):
        return None
    dtype = np.float16 if fam.model.dtype == torch.float16 else np.float32  # the graph's float type
    return cos[:, :half].astype(dtype), sin[:, :half].astype(dtype)


def write_gqa_decoder(tmp: Path, manifest: dict, fam: Any, progress: Progress) -> None:
    """``GQA_FILE`` beside the eager decoder, over its weights file, and its manifest entry (graphs.decoder.gqa):
    int4 q/k/v packed where the op takes them packed, GroupQueryAttention (rotary inside where the tables allow),
    ONNX Runtime's norm fusions."""
    import onnx

    from graph_passes.group_query_attention import AttentionPatternError, fuse_group_query_attention
    from graph_passes.ort_fusions import fuse_norms
    from graph_passes.pack_projections import pack_qkv

    kv, head_dim = manifest["decoder"]["kv_heads"], manifest["decoder"]["head_dim"]
    decoder = manifest["graphs"]["decoder"]
    heads = fam.text_config.num_attention_heads
    rotary = rotary_tables(fam, head_dim)
    quant_format = (manifest.get("quantization") or {}).get("graphs", {}).get("decoder", {}).get("format")
    if rotary is not None and quant_format == "matmulnbits":
        decoder["packed_qkv_layers"] = pack_qkv(tmp / decoder["file"], heads, kv, head_dim)  # bit-identical
    try:
        fuse_group_query_attention(tmp / decoder["file"], tmp / GQA_FILE, fam.num_layers, heads, kv, head_dim,
                                   rotary=rotary)
    except AttentionPatternError as exc:
        if rotary is None:
            raise
        progress(f"attention: the rotary embedding stays outside GroupQueryAttention ({exc})")
        rotary = None
        fuse_group_query_attention(tmp / decoder["file"], tmp / GQA_FILE, fam.num_layers, heads, kv, head_dim)
    fused = fuse_norms(tmp / GQA_FILE, tmp / GQA_FILE, heads, fam.text_config.hidden_size)
    inputs = [i.name for i in onnx.load(str(tmp / GQA_FILE), load_external_data=False).graph.input]
    decoder["gqa"] = {"file": GQA_FILE, "inputs": inputs,  # position_ids go with the rotary inside
                      "weights": "the decoder's (same external data file)", "fused": fused,
                      "rotary_inside": rotary is not None,
                      "max_positions": int(rotary[0].shape[0]) if rotary is not None else None}
    progress(f"attention: {GQA_FILE} = the decoder with ONNX Runtime GroupQueryAttention on a shared KV buffer and "
             "fused norms (same weights; one prompt at a time), beside the eager decoder (batches, TensorRT)")


def write_vision_mha(tmp: Path, fam: Any) -> dict[str, Any] | None:
    """``VISION_MHA_FILE`` beside the vision graph, over its weights file: the eager attention blocks rewritten into
    ONNX Runtime's MultiHeadAttention (no [heads, N, N] matrix; the runner uses it on the CPU and CUDA, TensorRT
    builds from the eager graph). Its manifest entry, or None where the vision graph has no such block."""
    from graph_passes.vision_attention import fuse_vision_attention

    vision = getattr(fam.config, "vision_config", None)
    heads = int(getattr(vision, "num_heads", 0) or getattr(vision, "num_attention_heads", 0) or 0)
    width = int(getattr(vision, "embed_dim", 0) or getattr(vision, "hidden_size", 0) or 0)
    if not heads or not width or width % heads:
        return None
    blocks = fuse_vision_attention(tmp / GRAPH_FILES["vision"], tmp / VISION_MHA_FILE, heads, width // heads)
    if not blocks:
        return None
    return {"file": VISION_MHA_FILE, "blocks": blocks, "attention": "com.microsoft::MultiHeadAttention",
            "weights": "the vision graph's (same external data file)"}


def not_validated() -> dict[str, str]:
    """The manifest's parity entry of a directory converted with --no-validate (`run` says so once)."""
    return {"status": "not validated",
            "why": "converted with --no-validate (the PyTorch reference was not run)",
            "fix": "scr-export validate DIR (on a machine with room for the float32 reference, or with --reference-device cuda --reference-dtype float16)"}


def expected_bytes(fam: Any, precision: str) -> int:
    """What the staging directory will hold at its fullest, from the checkpoint's element count: the float graphs
    (fp32 / fp16), or for quantized precisions the float32 export plus the quantized copy written beside it."""
    elements = sum(t.numel for t in fam.weights.checkpoint.tensors.values())
    per = {"fp32": 4.0, "fp16": 2.0}.get(precision, 4.0 * 1.35)
    return int(elements * per)


def convert_to_onnx(model: str, out: str | Path, *, precision: str = "fp32", exporter: str = "dynamo",
                    config_overrides: dict[str, Any] | None = None, force: bool = False,
                    progress: Progress = _stderr, finalize: Callable[[Path, dict, Any], None] | None = None,
                    quantize: Callable[[Path, dict, Any], None] | None = None, opset: int | None = None,
                    attention: str = "gqa", validate: bool = True):
    """Write ``out`` with the four graphs, tokenizer / image processor files and manifest.json.

    ``quantize(staging_dir, manifest, family)`` turns the float32 graphs into the quantized ones before validation
    (``calibration.quantize.Quantizer``; needed for int8 / int4 / fp8, which export at ``opset`` 21).
    ``finalize(staging_dir, manifest, family)`` may add files and manifest entries before the directory appears
    (the TensorRT converter does); the manifest is written again after it.
    ``attention="gqa"`` (default) also writes the decoder with its attention rewritten into ONNX Runtime's
    GroupQueryAttention on a shared KV buffer (``GQA_FILE``, over the same weights file): the runner uses it for one
    prompt on the CPU (or CUDA at fp16), the eager decoder for batches. ``"eager"`` writes the eager decoder only.
    """
    import torch

    from graph_passes.contract import ATTENTION_ROWS
    from graph_passes.extract_diagnostic import ExtractDiagnosticPass
    from graph_passes.insert_redistribution import InsertRedistributionPass
    from graph_passes.io import load_structure, save_structure

    from .loading import load_vlm
    from .onnx_export.decoder import export_decoder, io_names
    from .onnx_export.vision import export_embed_tokens, export_vision

    out = Path(out)
    if precision not in ("fp32", "fp16") + QUANTIZED:
        raise SCRExportError(f"precision {precision!r} is not supported for ONNX",
                             "use --precision fp32, fp16, int8, int4 or fp8")
    if (precision in QUANTIZED) != (quantize is not None):
        raise SCRExportError(f"precision {precision} needs the quantize step" if quantize is None else
                             "a quantize step was given for a float precision",
                             "call calibration.quantize.convert_quantized for int8 / int4 / fp8")
    if attention not in ("eager", "gqa"):
        raise SCRExportError(f"--attention {attention!r} is unknown", "use gqa (default) or eager")
    if exporter not in ("dynamo", "legacy"):
        raise SCRExportError(f"exporter {exporter!r} is unknown", "use --exporter dynamo (default) or legacy")
    check_out_dir(out, force)
    t0 = time.perf_counter()
    steps = 7 if quantize else 6
    streaming = exporter == "dynamo"  # traced without weights, each weight read from the checkpoint as it is written
    progress(f"[1/{steps}] reading {model} ({precision}" + (", structure only: the weights stream from the "
                                                           "checkpoint as they are written)" if streaming else ")"))
    fam = load_vlm(model, dtype="float16" if precision == "fp16" else "float32", weights=not streaming)
    config = fam.scr_config(**(config_overrides or {}))
    if streaming:
        check_free_space(out.parent, expected_bytes(fam, precision), f"converting to {precision} ONNX")
    with staged_directory(out) as tmp:
        image_inputs = fam.process_images([sample_image()])
        progress(f"[2/{steps}] exporting the vision encoder (dynamo)")
        export_vision(fam, image_inputs, tmp / GRAPH_FILES["vision"])
        vision_mha = write_vision_mha(tmp, fam)
        progress(f"[3/{steps}] exporting the token embeddings (dynamo)")
        export_embed_tokens(fam, tmp / GRAPH_FILES["embed_tokens"])
        progress(f"[4/{steps}] exporting the decoder with KV cache ({exporter}"
                 + (f", opset {opset})" if opset else ")"))
        # the decoder's weights are written once, into decoder_model_merged.onnx.data; the diagnostic graph (a cut
        # of the same graph) refers to that file too (the quantize step gives it weights of its own just before it
        # rewrites the decoder's)
        export_decoder(fam, tmp / GRAPH_FILES["decoder"], dynamo=exporter == "dynamo", opset=opset)
        progress(f"[5/{steps}] graph passes: SCR after layers {config.layers[0]}..{config.layers[1]}, "
                 f"diagnostic over layers {config.diag_layers[0]}..{config.diag_layers[1]}")
        diagnostic = load_structure(tmp / GRAPH_FILES["decoder"])
        ExtractDiagnosticPass(config.diag_layer_indices())(diagnostic)
        save_structure(diagnostic, tmp / GRAPH_FILES["diagnostic"])
        decoder = load_structure(tmp / GRAPH_FILES["decoder"])
        InsertRedistributionPass(config.layer_indices())(decoder)
        save_structure(decoder, tmp / GRAPH_FILES["decoder"])
        del decoder, diagnostic
        write_processing_files(fam, tmp)
        dec_in, dec_out = io_names(fam)
        manifest = {
            **manifest_common(fam, model, config), "precision": precision, "exporter": exporter,
            "graphs": {
                **host_graphs(fam),
                "diagnostic": {"file": GRAPH_FILES["diagnostic"], "inputs": dec_in[:3],
                               "outputs": [ATTENTION_ROWS]},
                "decoder": {"file": GRAPH_FILES["decoder"],
                            "inputs": dec_in + ["scr_donor", "scr_scale", "scr_weight"], "outputs": dec_out},
            },
            "parity": None,
        }
        if vision_mha:
            manifest["graphs"]["vision"]["mha"] = vision_mha
        write_manifest(tmp, manifest)
        if quantize is not None:
            progress(f"[6/{steps}] quantizing to {precision}")
            quantize(tmp, manifest, fam)
            write_manifest(tmp, manifest)
        if attention == "gqa":
            write_gqa_decoder(tmp, manifest, fam, progress)
            write_manifest(tmp, manifest)
        report = None
        if validate:
            progress(f"[{steps}/{steps}] parity against the PyTorch reference")
            from .parity import report_to_dict, validate_directory

            # the oracle is the float32 PyTorch model, whatever the exported precision; the exporter's model is
            # weight-less when streamed, so the reference and the deployed runtime are the only models in memory
            reference = fam if fam.model.dtype == torch.float32 and not streaming else None
            report = validate_directory(tmp, family=reference)
            manifest["parity"] = report_to_dict(report)
        else:
            progress(f"[{steps}/{steps}] parity NOT checked (--no-validate): run `scr-export validate {out}` later")
            manifest["parity"] = not_validated()
        if finalize is not None:
            finalize(tmp, manifest, fam)
        write_manifest(tmp, manifest)
    progress(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return out, report
