"""Cut a decoder graph after its last diagnostic layer and expose each diagnostic layer's head-mean attention."""

from __future__ import annotations

import re

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from .contract import ATTENTION_ROWS
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
    2. New sole output scr_attention_rows [B, L, T, T]: layer l's attention probabilities averaged over heads. The
       host averages the layers and each image's query rows in float64 (``scr_export.attention_map``), the same
       function every runtime uses, so the runtimes differ only by their attention arithmetic.
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

        axes_heads = add("Constant", [], value_ints=[1])
        rows = []
        for i in self.diag_layers:
            p = add("Cast", [probs[i]], to=ir.DataType.FLOAT)
            rows.append(add("ReduceMean", [p, axes_heads], keepdims=1))  # [B, 1, T, T]
        out = ir.node("Concat", rows, attributes={"axis": 1}) if len(rows) > 1 else ir.node("Identity", rows)
        nodes.append(out)
        result = out.outputs[0]
        result.name = ATTENTION_ROWS
        result.dtype = ir.DataType.FLOAT
        result.shape = ir.Shape(["batch", len(rows), "seq", "seq"])
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
        if [v.name for v in model.graph.outputs] != [ATTENTION_ROWS]:
            raise ir.passes.PostconditionError(f"the diagnostic graph must have exactly one output, {ATTENTION_ROWS}")
