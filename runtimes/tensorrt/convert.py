"""`scr-export convert MODEL --to trt`: the ONNX graphs (validated against the PyTorch reference with ONNX Runtime),
the SCR kernel's PTX for the plugin, optimisation profiles sized from the model and the user's limits, a
``build_engines.sh`` for the target, and, where TensorRT and a GPU are present, the engines themselves.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scr_export import __version__
from scr_export.errors import SCRExportError

from .build_script import build_script
from .plugin_rules import MIN_TRT_FUNCTION, MIN_TRT_PLUGIN, ptx_file_name
from .profiles import Limits, graph_profiles, model_shape, resolve

PTX_DIR = "plugin"
ENGINE_FILES = {"vision": "vision.engine", "embed_tokens": "embed_tokens.engine", "diagnostic": "diagnostic.engine",
                "decoder": "decoder.engine"}


def tensorrt_status() -> str | None:
    """None when engines can be built here, else why not (in words)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT is not importable ({exc})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def _write_ptx(directory: Path, progress) -> dict[str, Any]:
    from runtimes.kernels import build

    if not build.nvcc_available():
        progress("nvcc is not installed here: no PTX written (build_engines.sh plugin regenerates it on the target "
                 "with `scr-export build-ops --ptx`)")
        return {}
    out = directory / PTX_DIR
    out.mkdir(exist_ok=True)
    report = {}
    for arch in build.PTX_ARCHS:
        ptx = build.build_ptx(arch, out=out / ptx_file_name(arch))
        regs = build.ptxas_report(ptx, arch)
        report[arch] = {"file": f"{PTX_DIR}/{ptx.name}", "entries": regs}
        spills = sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in regs.values())
        progress(f"PTX compute_{arch}: {len(regs)} entry points, <= {max(r['registers'] for r in regs.values())} "
                 f"registers, {spills} spill bytes")
    return report


def convert_to_trt(model: str, out: str | Path, *, precision: str = "fp16", limits: Limits = Limits(),
                   config_overrides: dict[str, Any] | None = None, force: bool = False,
                   progress: Callable[[str], None] | None = None, build: str = "auto",
                   quantize: Callable | None = None, opset: int | None = None, validate: bool = True):
    """Returns (out, ONNX Runtime parity report (None with ``validate=False``), engine record or None).

    int8 / fp8 / int4 come through ``calibration.quantize.convert_quantized``, which passes its ``quantize`` step:
    the engines are then built from the quantized Q/DQ files as they are (explicit quantization, strongly typed).
    """
    from scr_export.convert import _stderr, convert_to_onnx
    from scr_export.manifest import QUANTIZED

    progress = progress or _stderr
    if precision not in ("fp32", "fp16") + QUANTIZED:
        raise SCRExportError(f"precision {precision!r} is not supported for TensorRT engines here",
                             "use --precision fp16 (default), fp32, int8, int4 or fp8; bf16 graphs are not exported "
                             "yet")
    if build not in ("auto", "never", "always"):
        raise SCRExportError(f"--build-engines {build!r} is unknown", "use auto, never or always")
    why_not = tensorrt_status()
    if build == "always" and why_not:
        raise SCRExportError(f"cannot build TensorRT engines here: {why_not}",
                             "use --build-engines auto (writes build_engines.sh for the target) or run on the target")

    def finalize(tmp: Path, manifest: dict, fam: Any) -> None:
        shape = model_shape(fam)
        lim = resolve(limits, shape)
        profiles = graph_profiles(tmp, manifest, lim, shape)
        ptx = _write_ptx(tmp, progress)
        from .plugin_rules import check_plugin_covers

        scr_types = check_plugin_covers(tmp / manifest["graphs"]["decoder"]["file"])
        manifest["tensorrt"] = {
            "limits": lim.to_dict(), "profiles": profiles, "engine_files": ENGINE_FILES,
            "ptx_dir": PTX_DIR, "ptx": ptx, "plugin": "scr::SCRNeighbourInject v1 (QDP, ahead-of-time PTX)",
            "scr_node_types": sorted(set(scr_types.values())),
            "quantization": ("explicit (Q/DQ in the graph), strongly typed network" if manifest.get("quantization")
                             else None),
            "min_tensorrt": {"plugin": ".".join(map(str, MIN_TRT_PLUGIN)),
                             "function": ".".join(map(str, MIN_TRT_FUNCTION))},
            "engines": None,
            "not_built_because": "--build-engines never" if build == "never" else why_not,
        }
        script = tmp / "build_engines.sh"
        script.write_text(build_script(manifest, profiles, __version__))
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    out, report = convert_to_onnx(model, out, precision=precision, config_overrides=config_overrides, force=force,
                                  progress=progress, finalize=finalize, quantize=quantize, opset=opset,
                                  attention="eager", validate=validate)  # GroupQueryAttention is an ONNX Runtime contrib op
    engines = None
    if build != "never" and why_not is None:
        from .engines import build_engines

        engines = build_engines(out, progress)
    else:
        progress(f"TensorRT engines were NOT built: {why_not or 'asked not to'}. On the target device run "
                 f"{out / 'build_engines.sh'} (plugin path with TensorRT >= 10.13, trtexec otherwise)")
    return out, report, engines
