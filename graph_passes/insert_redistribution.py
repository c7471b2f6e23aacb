"""Insert one scr::SCRNeighbourInject node after each decoder layer output of the SCR range, fed by plan inputs."""

from __future__ import annotations

import onnx_ir as ir

from .locate_layers import find_layer_outputs
from .scr_op import DOMAIN, DOMAIN_VERSION, OP_TYPE, PLAN_INPUTS, plugin_attributes, scr_function


# onnx_ir re-raises what requires()/ensures() raise as its own error, with ours as the cause (our message).
PreconditionError = ir.passes.PreconditionError
PostconditionError = ir.passes.PostconditionError


class InsertRedistributionPass(ir.passes.InPlacePass):
    """Add the SCR plan inputs and redistribute after every decoder layer in ``layers``.

    1. Preconditions: the plan inputs (scr_donor, scr_scale, scr_weight) are absent; every layer in ``layers`` has
       a located output; the graph has an ``inputs_embeds``-like input whose first two axes are [batch, seq].
    2. New graph inputs: scr_donor int64 [batch, seq], scr_scale and scr_weight float32 [batch, seq].
    3. For each layer l: h' = SCRNeighbourInject(h_l, donor, scale, weight); every consumer of h_l (and a graph
       output equal to it) now reads h'.
    4. The op's function body is added to the model, and the ``scr`` domain to its opsets.
    Postconditions: exactly one SCR node per layer, each consuming that layer's original output.
    """

    def __init__(self, layers: range, hidden_input: str = "inputs_embeds"):
        super().__init__()
        self.layers = layers
        self.hidden_input = hidden_input
        self.inserted: dict[int, ir.Node] = {}

    def requires(self, model: ir.Model) -> None:
        names = {v.name for v in model.graph.inputs}
        present = [n for n in PLAN_INPUTS if n in names]
        if present:
            raise PreconditionError(f"the graph already has SCR plan inputs {present}: it was rewritten before")
        if self.hidden_input not in names:
            raise PreconditionError(f"the graph has no {self.hidden_input!r} input to take the [batch, seq] axes from; "
                                    f"inputs are {sorted(names)}")
        if len(self.layers) == 0:
            raise PreconditionError("the SCR layer range is empty")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = find_layer_outputs(model, self.layers)
        embeds = next(v for v in graph.inputs if v.name == self.hidden_input)
        dims = list(embeds.shape)[:2] if embeds.shape is not None else ["batch", "seq"]
        donor = ir.val(PLAN_INPUTS[0], ir.DataType.INT64, dims)
        scale = ir.val(PLAN_INPUTS[1], ir.DataType.FLOAT, dims)
        weight = ir.val(PLAN_INPUTS[2], ir.DataType.FLOAT, dims)
        graph.inputs.extend([donor, scale, weight])
        for i in self.layers:
            h = outputs[i].value
            node = ir.node(OP_TYPE, [h, donor, scale, weight], domain=DOMAIN, name=f"scr_inject_layer_{i}",
                           attributes=plugin_attributes(), metadata_props={"scr.layer": str(i)})
            new = node.outputs[0]
            new.name = f"scr_hidden_{i}"
            if h.dtype is not None:  # legacy graphs carry no types on intermediate values
                new.dtype = h.dtype
            if h.shape is not None:
                new.shape = h.shape
            # every consumer of h (but the new node) reads h'; then insert the node right after h's producer
            for user, index in list(h.uses()):
                if user is not node:
                    user.replace_input_with(index, new)
            for k, out in enumerate(graph.outputs):
                if out is h:
                    graph.outputs[k] = new
            graph.insert_after(outputs[i].node, node)
            self.inserted[i] = node
        opset = model.opset_imports.get("", 18)
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        model.functions[(DOMAIN, OP_TYPE, "")] = scr_function(opset)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        scr_nodes = [n for n in model.graph if n.op_type == OP_TYPE and n.domain == DOMAIN]
        if len(scr_nodes) != len(self.layers):
            raise PostconditionError(f"expected {len(self.layers)} SCR nodes, found {len(scr_nodes)}")
        for i, node in self.inserted.items():
            if len(node.outputs[0].uses()) == 0 and node.outputs[0] not in model.graph.outputs:
                raise PostconditionError(f"the SCR node of layer {i} has no consumer")
