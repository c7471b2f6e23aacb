"""Expose the hidden state after every decoder layer as a graph output, for per-layer parity (``validate
--per-layer``): ``layer_out.{i}`` is layer i's output after its SCR node where it has one (the state the next layer
reads), so a deployed graph can be compared layer by layer with the PyTorch reference."""

from __future__ import annotations

import onnx_ir as ir

from .contract import DOMAIN, OP_TYPE
from .locate_layers import find_layer_outputs

LAYER_OUTPUT = "layer_out.{}"


class ExposeLayerOutputsPass(ir.passes.InPlacePass):
    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.names: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        found = find_layer_outputs(model, range(self.num_layers))
        scr = {n.name: n for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN}
        for i in range(self.num_layers):
            node = scr.get(f"scr_inject_layer_{i}")
            value = node.outputs[0] if node is not None else found[i].value
            ident = ir.node("Identity", [value])
            out = ident.outputs[0]
            out.name = LAYER_OUTPUT.format(i)
            out.dtype, out.shape = value.dtype, value.shape
            graph.append(ident)
            graph.outputs.append(out)
            self.names.append(out.name)
        return ir.passes.PassResult(model, modified=True)


def expose_layer_outputs(proto, num_layers: int) -> list[str]:
    """Edit an ``onnx.ModelProto`` (weights left external) in place; returns the new output names."""
    model = ir.serde.deserialize_model(proto)
    p = ExposeLayerOutputsPass(num_layers)
    p(model)
    proto.CopyFrom(ir.serde.serialize_model(model))
    return p.names
