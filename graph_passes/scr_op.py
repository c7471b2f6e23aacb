"""The `scr::SCRNeighbourInject` op: its contract, its standard-op ONNX function body, and a numpy reference.

    inputs : hidden [B,T,D] (float/float16), donor [B,T] int64, scale [B,T] float, weight [B,T] float
    output : hidden' [B,T,D] = scale * hidden + weight * hidden[b, donor[b,t], :]

λ lives in the plan (scale/weight), not in attributes, so one graph serves any λ. The body uses only Cast,
Unsqueeze, GatherND (batch_dims=1), Mul, Add and CastLike, so any ONNX runtime runs it; a registered kernel
(ORT custom op, TensorRT plugin) may replace it. Arithmetic is float32 whatever the hidden dtype, as in the
PyTorch reference.
"""

from __future__ import annotations

import numpy as np

from .contract import DOMAIN, DOMAIN_VERSION, OP_TYPE, PLAN_INPUTS  # noqa: F401 (the op contract, re-exported)
# TensorRT's ONNX parser (>= 10.7) picks a registered plugin over the node's local function only when the node names
# the plugin's namespace; older parsers (JetPack 6's 10.3) import the function body. ORT and onnx.checker ignore them.
PLUGIN_VERSION = "1"


def plugin_attributes() -> dict:
    return {"plugin_namespace": DOMAIN, "plugin_version": PLUGIN_VERSION}


def reference(hidden: np.ndarray, donor: np.ndarray, scale: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """SCR.md pass 2 for one layer, in numpy: the oracle for the function body and for kernels."""
    h = hidden.astype(np.float32)
    gathered = np.take_along_axis(h, donor.astype(np.int64)[:, :, None], axis=1)
    out = scale.astype(np.float32)[:, :, None] * h + weight.astype(np.float32)[:, :, None] * gathered
    return out.astype(hidden.dtype)


def scr_function(opset: int):
    """The op's ONNX local function (onnx_ir), for a model whose default-domain opset is ``opset``."""
    import onnx_ir as ir

    hidden = ir.val("hidden")
    donor = ir.val("donor")
    scale = ir.val("scale")
    weight = ir.val("weight")
    nodes = []

    def add(op, inputs, **attrs):
        n = ir.node(op, inputs, attributes=attrs or None)
        nodes.append(n)
        return n.outputs[0]

    axes = add("Constant", [], value_ints=[-1])
    h32 = add("Cast", [hidden], to=ir.DataType.FLOAT)
    idx = add("Unsqueeze", [donor, axes])
    rows = add("GatherND", [h32, idx], batch_dims=1)
    s = add("Unsqueeze", [add("Cast", [scale], to=ir.DataType.FLOAT), axes])
    w = add("Unsqueeze", [add("Cast", [weight], to=ir.DataType.FLOAT), axes])
    out32 = add("Add", [add("Mul", [h32, s]), add("Mul", [rows, w])])
    out = ir.node("CastLike", [out32, hidden])
    nodes.append(out)
    out.outputs[0].name = "hidden_out"
    graph = ir.Graph([hidden, donor, scale, weight], [out.outputs[0]], nodes=nodes, opset_imports={"": opset},
                     name=OP_TYPE)
    return ir.Function(DOMAIN, OP_TYPE, graph=graph, attributes=[])


def standalone_model(dtype: str = "float32", opset: int = 20, float32_io: bool = False):
    """A model holding one SCRNeighbourInject node (for tests, kernels and benchmarks).

    ``float32_io`` casts float32 graph inputs/outputs to and from ``dtype`` around the node (bfloat16 has no numpy
    type for ONNX Runtime's Python feeds).
    """
    import onnx_ir as ir

    dt = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}[dtype]
    io = ir.DataType.FLOAT if float32_io else dt
    hidden = ir.val("hidden", io, ["B", "T", "D"])
    donor = ir.val("donor", ir.DataType.INT64, ["B", "T"])
    scale = ir.val("scale", ir.DataType.FLOAT, ["B", "T"])
    weight = ir.val("weight", ir.DataType.FLOAT, ["B", "T"])
    nodes = []
    h = hidden
    if float32_io:
        nodes.append(ir.node("Cast", [hidden], attributes={"to": dt}, name="to_dtype"))
        h = nodes[-1].outputs[0]
        h.dtype, h.shape = dt, ir.Shape(["B", "T", "D"])
    node = ir.node(OP_TYPE, [h, donor, scale, weight], domain=DOMAIN, name="scr_inject", attributes=plugin_attributes())
    nodes.append(node)
    out = node.outputs[0]
    out.dtype, out.shape = dt, ir.Shape(["B", "T", "D"])
    if float32_io:
        nodes.append(ir.node("Cast", [out], attributes={"to": io}, name="to_float32"))
        out = nodes[-1].outputs[0]
    out.name, out.dtype, out.shape = "hidden_out", io, ir.Shape(["B", "T", "D"])
    graph = ir.Graph([hidden, donor, scale, weight], [out], nodes=nodes,
                     opset_imports={"": opset, DOMAIN: DOMAIN_VERSION}, name="scr_inject")
    fn = scr_function(opset)
    return ir.Model(graph, ir_version=10, functions=[fn])
