"""Who makes and who reads each tensor of an ONNX ``GraphProto`` (the index the proto-level checks and rewrites
walk: the quantization check, the GroupQueryAttention rewrite, the plugin type rules, the runner's uint8 reload)."""

from __future__ import annotations

from typing import Any


def tensor_edges(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(producer: tensor -> the node that outputs it, consumers: tensor -> the nodes that read it, in graph order)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers
