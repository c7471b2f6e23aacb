"""The SCRNeighbourInject TensorRT plugin (a quickly deployable Python plugin with an ahead-of-time implementation:
the CUDA kernel's PTX is embedded in the engine, so the engine runs without Python, e.g. in trtexec or C++).

``register(ptx_dir)`` must run before the ONNX parser sees the decoder; it needs TensorRT >= 10.13. On older
TensorRT the parser imports the node's ONNX function body instead (see plugin_rules.scr_path_for).
Not exercised in CI (TensorRT cannot be installed there); its decisions live in plugin_rules and are tested.
"""

from __future__ import annotations

from pathlib import Path

from .plugin_rules import (PLUGIN_ID, TRT_TYPE_NAMES, TYPE_COMBINATION, aot_launch, choose_ptx, ptx_file_name,
                           scr_path_for)

_REGISTERED: dict = {}


def available_ptx(ptx_dir: Path) -> dict[str, Path]:
    return {p.stem.rsplit("sm", 1)[1]: p for p in Path(ptx_dir).glob(ptx_file_name("*"))}


def register(ptx_dir: str | Path, capability: tuple[int, int]) -> str:
    """Register the plugin with TensorRT's plugin registry; returns the PTX arch that will be embedded."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if scr_path_for(trt.__version__) != "plugin":
        raise RuntimeError(f"TensorRT {trt.__version__} has no ahead-of-time Python plugins (needs >= 10.13)")
    arch, ptx_path = choose_ptx(capability, available_ptx(Path(ptx_dir)))
    if PLUGIN_ID in _REGISTERED:
        return _REGISTERED[PLUGIN_ID]
    ptx = ptx_path.read_bytes()
    trt_names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}

    @trtp.register(PLUGIN_ID)
    def scr_desc(hidden: trtp.TensorDesc, donor: trtp.TensorDesc, scale: trtp.TensorDesc,
                 weight: trtp.TensorDesc) -> trtp.TensorDesc:
        return hidden.like()

    @trtp.autotune(PLUGIN_ID)
    def scr_autotune(hidden, donor, scale, weight, outputs):
        return [trtp.AutoTuneCombination(TYPE_COMBINATION)]

    @trtp.aot_impl(PLUGIN_ID)
    def scr_aot(hidden: trtp.TensorDesc, donor: trtp.TensorDesc, scale: trtp.TensorDesc, weight: trtp.TensorDesc,
                outputs, tactic: int):
        dims = hidden.shape_expr
        dim = dims[2].constant_value if dims[2].is_constant else None
        launch = aot_launch(trt_names[hidden.dtype], dim)
        params = trtp.KernelLaunchParams()
        params.grid_x = dims[0] * dims[1]
        params.block_x = launch["block_x"]
        params.shared_mem = 0
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(dims[1]), trtp.SymInt32(dims[2])])
        return launch["entry"].encode(), ptx, params, extra

    assert set(TRT_TYPE_NAMES.values()) == set(trt_names.values())
    _REGISTERED[PLUGIN_ID] = arch
    return arch
