"""Build a converted directory's TensorRT engines with the TensorRT Python API (`scr-export build-engines DIR`).

Strongly typed networks (the ONNX graph's types decide the precision, as TensorRT 11 requires), the profiles from
manifest["tensorrt"]["profiles"], the SCR plugin registered first where TensorRT supports it (>= 10.13) so the
parser picks it over the node's function body. Which path each engine took is read back from the built engine
(engine inspector) and written into the manifest. Needs TensorRT and a GPU: not exercised in CI.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from scr_export.errors import SCRExportError
from scr_export.manifest import read_manifest, write_manifest

from .build_script import ENGINE_DIR
from .plugin_rules import scr_path_for


class TensorRTUnavailable(SCRExportError):
    """TensorRT (or a GPU for it) is not available here."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not importable here ({exc})",
                                  "install TensorRT on the target (JetPack, or pip install tensorrt where NVIDIA's "
                                  "package index is reachable), or run build_engines.sh trtexec there") from None
    return trt


def gpu_capability() -> tuple[int, int]:
    from .cuda import CudaUnavailable, device_capability

    try:
        return device_capability()
    except CudaUnavailable as exc:
        raise TensorRTUnavailable(exc.problem, exc.fix) from None


def _engine_uses_plugin(trt, engine) -> bool:
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return "SCRNeighbourInject" in info and "PluginV3" in info


def build_engine(trt, onnx_path: Path, engine_path: Path, profiles: list[dict], workspace_gib: float = 4.0) -> bool:
    """Build and serialise one engine; returns whether the SCR plugin is in it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SCRExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}",
                             "check the TensorRT version (>= 10.0); report the error with the manifest")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, s in prof.items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(p)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise SCRExportError(f"TensorRT failed to build an engine from {onnx_path.name}",
                             "see TensorRT's log above; lower the limits (--max-seq) if memory ran out")
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(blob))
    os.replace(tmp, engine_path)
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(blob))
    return _engine_uses_plugin(trt, engine)


def build_engines(directory: str | Path, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Build every engine the manifest lists; record the result in the manifest and return it."""
    d = Path(directory)
    manifest = read_manifest(d)
    if "tensorrt" not in manifest:
        raise SCRExportError(f"{d} was not converted for TensorRT", f"run `scr-export convert MODEL --to trt --out {d}`")
    trt = import_tensorrt()
    path = scr_path_for(trt.__version__)
    capability = gpu_capability()
    arch = None
    if path == "plugin":
        from .plugin import register

        arch = register(d / manifest["tensorrt"]["ptx_dir"], capability)
    (d / ENGINE_DIR).mkdir(exist_ok=True)
    graphs = {}
    for graph, engine_file in manifest["tensorrt"]["engine_files"].items():
        t0 = time.perf_counter()
        progress(f"building {graph} ({manifest['graphs'][graph]['file']}) with TensorRT {trt.__version__}")
        profiles = manifest["tensorrt"]["profiles"][graph]
        uses_plugin = build_engine(trt, d / manifest["graphs"][graph]["file"], d / ENGINE_DIR / engine_file, profiles)
        graphs[graph] = {"file": f"{ENGINE_DIR}/{engine_file}", "scr_path": "plugin" if uses_plugin else "function",
                         "profiles": len(profiles), "seconds": round(time.perf_counter() - t0, 1)}
        if graph == "decoder" and path == "plugin" and not uses_plugin:
            raise SCRExportError("TensorRT imported the SCR nodes as their function body although the plugin was "
                                 "registered", "report this with the TensorRT version; build_engines.sh trtexec "
                                 "gives a working (function-body) engine meanwhile")
    manifest["tensorrt"]["engines"] = {"builder": "scr-export", "tensorrt": trt.__version__,
                                       "gpu": f"sm_{capability[0]}{capability[1]}", "ptx_arch": arch,
                                       "graphs": graphs}
    write_manifest(d, {k: v for k, v in manifest.items() if k != "format"})
    progress(json.dumps(graphs))
    return manifest["tensorrt"]["engines"]
