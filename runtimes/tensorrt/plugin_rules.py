"""The plain-Python parts of the SCRNeighbourInject TensorRT plugin: which TensorRT gets the plugin, the shape and
type rules, the ahead-of-time launch (entry point, grid, block, int32 arguments) and which PTX to embed. The QDP
definitions in ``plugin.py`` are thin wrappers over these, so they are unit-tested without TensorRT.
"""

from __future__ import annotations

import re
from pathlib import Path

from graph_passes.edges import tensor_edges
from graph_passes.scr_op import DOMAIN, OP_TYPE, PLUGIN_VERSION
from runtimes.kernels.launch import block_threads, entry_name, vector_width, vectorised

PLUGIN_ID = f"{DOMAIN}::{OP_TYPE}"
# AOT QDP plugins exist from 10.9; 10.13 is the first release we accept (JetPack 7 / desktop CUDA 13 level).
MIN_TRT_PLUGIN = (10, 13)
# the ONNX function body (standard ops) imports on any TensorRT 10 parser (JetPack 6 ships 10.3)
MIN_TRT_FUNCTION = (10, 0)
INPUTS = ("hidden", "donor", "scale", "weight")
# one combination per hidden type: positions hidden, donor, scale, weight, out (zipped by TensorRT)
TYPE_COMBINATION = "FP32|FP16|BF16, INT64|INT64|INT64, FP32|FP32|FP32, FP32|FP32|FP32, FP32|FP16|BF16"
TRT_TYPE_NAMES = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16"}


def parse_version(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def scr_path_for(trt_version: str) -> str:
    """'plugin' where the AOT plugin is supported, 'function' where the node's ONNX function is imported instead."""
    v = parse_version(trt_version)
    if v >= MIN_TRT_PLUGIN:
        return "plugin"
    if v >= MIN_TRT_FUNCTION:
        return "function"
    raise ValueError(f"TensorRT {trt_version} is older than 10.0, which scr-export needs")


def output_shape(hidden_shape: tuple, donor_shape: tuple, scale_shape: tuple, weight_shape: tuple) -> tuple:
    """The output is shaped like hidden; the plan inputs must be [B, T] of hidden's [B, T, D]."""
    if len(hidden_shape) != 3:
        raise ValueError(f"{OP_TYPE}: hidden must be [B, T, D], got rank {len(hidden_shape)}")
    for name, s in zip(INPUTS[1:], (donor_shape, scale_shape, weight_shape)):
        if len(s) != 2:
            raise ValueError(f"{OP_TYPE}: {name} must be [B, T], got rank {len(s)}")
    return tuple(hidden_shape)


def type_combinations() -> list[tuple[str, ...]]:
    """The (hidden, donor, scale, weight, out) type tuples TYPE_COMBINATION declares, as TensorRT zips them."""
    cols = [c.strip().split("|") for c in TYPE_COMBINATION.split(",")]
    n = max(len(c) for c in cols)
    assert all(len(c) in (1, n) for c in cols)
    return [tuple(c[i] if len(c) > 1 else c[0] for c in cols) for i in range(n)]


def aot_launch(dtype: str, dim: int | None) -> dict:
    """Entry point, threads per block and int32 arguments of the AOT launch for hidden states of ``dtype``.

    ``dim`` is the hidden size when the engine's shape is static in D (it always is for a decoder), else None: the
    element-wise entry with 256 threads then serves any D. Grid: one block per (b, t) row (B*T, a shape expression).
    Kernel arguments: hidden, donor, scale, weight pointers, then int32 seq and dim, then the output pointer.
    """
    if dtype not in TRT_TYPE_NAMES.values():
        raise ValueError(f"{OP_TYPE} has no kernel for {dtype}")
    if dim is None:
        return {"entry": entry_name(dtype, 1), "block_x": 256, "extra_args": ("seq", "dim")}
    vec = vector_width(dtype) if vectorised(dtype, dim) else 1
    return {"entry": entry_name(dtype, dim), "block_x": block_threads(dim, vec), "extra_args": ("seq", "dim")}


def ptx_file_name(arch: str) -> str:
    return f"scr_neighbour_inject_sm{arch}.ptx"


def choose_ptx(capability: tuple[int, int], available: dict[str, Path]) -> tuple[str, Path]:
    """The PTX to embed for a GPU of compute ``capability``: the newest compute_XY with XY <= the GPU's (PTX is
    JIT-compiled forward by the driver). ``available`` maps arch strings ('87') to files."""
    cc = capability[0] * 10 + capability[1]
    fitting = sorted((int(a), a) for a in available if int(a) <= cc)
    if not fitting:
        have = ", ".join(f"compute_{a}" for a in sorted(available)) or "none"
        raise FileNotFoundError(f"no SCR kernel PTX fits sm_{cc} (have: {have}); "
                                f"run `scr-export build-ops --ptx {cc}` on this machine")
    arch = fitting[-1][1]
    return arch, available[arch]


def ptx_entries(ptx_text: str) -> set[str]:
    return set(re.findall(r"\.visible \.entry (\w+)\(", ptx_text))


def onnx_node_attributes() -> dict:
    """What the SCR nodes carry for TensorRT's parser (set by InsertRedistributionPass)."""
    return {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}


_ONNX_TO_TRT = {1: "FP32", 10: "FP16", 16: "BF16"}  # onnx.TensorProto element types


def scr_node_types(onnx_path: Path) -> dict[str, str]:
    """The hidden-state type each SCR node of a graph sees (TensorRT's names; "unsupported:<onnx type>" when none
    of the plugin's type combinations fits), from the graph's declared types."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.value_info,
                                                             *model.graph.output)}
    producer, _ = tensor_edges(model.graph)
    found = {}
    for n in model.graph.node:
        if n.op_type != OP_TYPE or n.domain != DOMAIN:
            continue
        t = types.get(n.input[0])
        if t is None:  # an untyped intermediate: the type of the Add that made it (its inputs are typed)
            p = producer.get(n.input[0])
            t = next((types[i] for i in (p.input if p is not None else []) if i in types), None)
        found[n.name] = _ONNX_TO_TRT.get(t, f"unsupported:{onnx.TensorProto.DataType.Name(t) if t else 'unknown'}")
    return found


def check_plugin_covers(onnx_path: Path) -> dict[str, str]:
    """Every SCR node's hidden type is one the plugin declares (quantized graphs keep SCR float: a Q/DQ on an SCR
    input would make TensorRT hand the plugin int8/fp8, which it has no kernel for)."""
    declared = {combo[0] for combo in type_combinations()}
    found = scr_node_types(onnx_path)
    bad = {n: t for n, t in found.items() if t not in declared}
    if bad:
        raise ValueError(f"{Path(onnx_path).name}: SCR nodes see types the plugin does not declare: {bad} "
                         f"(declared: {sorted(declared)})")
    return found
