"""Cut a decoder graph after its last diagnostic layer and expose SCR.md's attention map, given a query mask."""

from __future__ import annotations

import re

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from .contract import ATTENTION_MAP, QUERY_MASK
from .locate_layers import LayerOutputsNotFound, _scopes

_LEGACY_SOFTMAX = re.compile(r"^.*/layers\.(?P<layer>\d+)/self_attn/Softmax(?:_\d+)?$")
_SCOPE_ATTN = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.self_attn$")


def find_attention_probs(model: ir.Model) -> dict[int, ir.Value]:
    """The attention probabilities [B, H, T, T_total] of each layer (eager attention's Softmax)."""
    found: dict[int, ir.Value] = {}
    for node in model.graph:
        if node.op_type != "Softmax":
            continue
        scopes = _scopes(node)
        m = _SCOPE_ATTN.search(scopes[-2]) if scopes and len(scopes) >= 2 else None
        m = m or (_LEGACY_SOFTMAX.match(node.name) if node.name else None)
        if m:
            found[int(m.group("layer"))] = node.outputs[0]
    return found


class ExtractDiagnosticPass(ir.passes.InPlacePass):
    """Turn a (copy of the) decoder graph into the diagnostic graph of SCR.md pass 1.

    1. Precondition: every layer in ``diag_layers`` has an attention Softmax (the export used eager attention).
    2. New input scr_query_mask [B, I, T]; new sole output scr_attention [B, I, T] =
       (query_mask @ mean_{layers, heads} P) / Σ query_mask, i.e. A averaged over each image's query positions.
    3. Everything not needed for that output (later layers, the head, the KV outputs) is removed.
    Meant for the prefill (past length 0), where the key axis is the sequence.
    """

    def __init__(self, diag_layers: range):
        super().__init__()
        self.diag_layers = diag_layers

    def requires(self, model: ir.Model) -> None:
        probs = find_attention_probs(model)
        missing = [i for i in self.diag_layers if i not in probs]
        if missing:
            raise LayerOutputsNotFound(
                f"cannot find the attention probabilities of layers {missing}: no Softmax under "
                "'layers.N.self_attn' (dynamo scopes) or '/layers.N/self_attn/Softmax' (legacy names). "
                "Export the decoder with eager attention (attn_implementation='eager'); SDPA and flash attention "
                "do not expose probabilities.")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        probs = find_attention_probs(model)
        nodes = []

        def add(op, inputs, **attrs):
            n = ir.node(op, inputs, attributes=attrs or None)
            nodes.append(n)
            return n.outputs[0]

        mask = ir.val(QUERY_MASK, ir.DataType.FLOAT, ["batch", "images", "seq"])
        graph.inputs.append(mask)
        axes_heads = add("Constant", [], value_ints=[1])
        total = None
        for i in self.diag_layers:
            p = add("Cast", [probs[i]], to=ir.DataType.FLOAT)
            mean = add("ReduceMean", [p, axes_heads], keepdims=0)  # [B, T, T]
            total = mean if total is None else add("Add", [total, mean])
        scale = add("Constant", [], value_float=1.0 / len(self.diag_layers))
        layer_mean = add("Mul", [total, scale])
        summed = add("MatMul", [mask, layer_mean])  # [B, I, T]
        axes_last = add("Constant", [], value_ints=[-1])
        count = add("ReduceSum", [mask, axes_last], keepdims=1)
        eps = add("Constant", [], value_float=1e-30)
        out = ir.node("Div", [summed, add("Max", [count, eps])])
        nodes.append(out)
        result = out.outputs[0]
        result.name = ATTENTION_MAP
        result.dtype = ir.DataType.FLOAT
        result.shape = ir.Shape(["batch", "images", "seq"])
        graph.extend(nodes)
        graph.outputs.clear()
        graph.outputs.append(result)
        common_passes.RemoveUnusedNodesPass()(model)
        used = {id(v) for n in graph for v in n.inputs if v is not None}
        keep = [v for v in graph.inputs if id(v) in used]
        graph.inputs.clear()
        graph.inputs.extend(keep)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if [v.name for v in model.graph.outputs] != [ATTENTION_MAP]:
            raise ir.passes.PostconditionError("the diagnostic graph must have exactly one output, scr_attention")
        if QUERY_MASK not in {v.name for v in model.graph.inputs}:
            raise ir.passes.PostconditionError("the diagnostic graph lost its query-mask input")
