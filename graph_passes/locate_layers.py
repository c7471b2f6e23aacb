"""Find each decoder layer's output (the residual stream after its second residual add) in an exported graph."""

from __future__ import annotations

import ast
import dataclasses
import re

import onnx_ir as ir

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_LEGACY_NAME = re.compile(r"^(?P<scope>.*/layers\.(?P<layer>\d+))/Add(?:_(?P<n>\d+))?$")
_SCOPE_LAYER = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)$")
_FUSED_OPS = {"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"}


class LayerOutputsNotFound(LookupError):
    """The decoder layer outputs could not be located; the message says why for each rule tried."""


@dataclasses.dataclass(frozen=True)
class LayerOutput:
    layer: int
    value: ir.Value
    node: ir.Node
    rule: str            # "dynamo" (name-scope metadata) or "legacy" (node names)


def _scopes(node: ir.Node) -> list[str] | None:
    raw = node.metadata_props.get(NAME_SCOPES)
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)  # a Python repr, not JSON
        except (ValueError, SyntaxError):
            return None
    return list(raw)


def _by_dynamo_scopes(graph: ir.Graph) -> dict[int, LayerOutput]:
    found: dict[int, LayerOutput] = {}
    for node in graph:  # graph order is topological: the last match per layer wins
        if node.op_type != "Add" or node.domain != "":
            continue
        scopes = _scopes(node)
        if not scopes or len(scopes) < 2:
            continue
        m = _SCOPE_LAYER.search(scopes[-2])  # innermost module scope of the node
        if m:
            i = int(m.group("layer"))
            found[i] = LayerOutput(i, node.outputs[0], node, "dynamo")
    return found


def _by_legacy_names(graph: ir.Graph) -> dict[int, LayerOutput]:
    found: dict[int, LayerOutput] = {}
    for node in graph:
        if node.op_type != "Add" or not node.name:
            continue
        m = _LEGACY_NAME.match(node.name)
        if m:
            i = int(m.group("layer"))
            found[i] = LayerOutput(i, node.outputs[0], node, "legacy")
    return found


def find_layer_outputs(model: ir.Model, layers: range | None = None) -> dict[int, LayerOutput]:
    """Decoder layer outputs by layer index; raise ``LayerOutputsNotFound`` with the reason of every rule tried.

    Rules: (1) dynamo — the last Add whose innermost ``pkg.torch.onnx.name_scopes`` entry is ``...layers.{i}``;
    (2) legacy TorchScript — the last node named ``/.../layers.{i}/Add[_n]``.
    """
    graph = model.graph
    reasons = []
    for rule, finder in (("dynamo name scopes", _by_dynamo_scopes), ("legacy node names", _by_legacy_names)):
        found = finder(graph)
        if not found:
            has_meta = any(NAME_SCOPES in n.metadata_props for n in graph)
            reasons.append(f"{rule}: no Add node matched"
                           + ("" if rule.startswith("legacy") or has_meta else f" (no node carries {NAME_SCOPES})"))
            continue
        indices = sorted(found)
        if indices != list(range(indices[-1] + 1)):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            reasons.append(f"{rule}: layers {missing} are missing among 0..{indices[-1]}")
            continue
        if layers is not None and max(layers, default=-1) > indices[-1]:
            reasons.append(f"{rule}: found layers 0..{indices[-1]} but layer {max(layers)} was asked for")
            continue
        return found
    fused = sorted({n.op_type for n in graph if n.op_type in _FUSED_OPS})
    hint = (f" The graph holds fused ops ({', '.join(fused)}): run the SCR passes before ONNX Runtime fusion."
            if fused else " Export with torch.onnx.export (dynamo or legacy) from the module layout of transformers.")
    raise LayerOutputsNotFound("cannot find the decoder layer outputs: " + "; ".join(reasons) + "." + hint)
