"""Replace a vision encoder's eager attention by ONNX Runtime's ``com.microsoft::MultiHeadAttention`` (ONNX Runtime
only; TensorRT builds from the eager graph, whose softmax(QK^T)V pattern its own fused attention recognises).

Eager attention materialises the scores and the probabilities, ``[batch, heads, N, N]`` each: for a photo at
Qwen2-VL's pixel limits (about 6000 patches, 16 heads) 2.3 GB apiece, the largest transient of a request. ONNX
Runtime's MultiHeadAttention runs a flash kernel on the CPU (blocks sized to the L2 cache) and flash or
memory-efficient attention on CUDA: no N x N matrix (measured: 6000 patches, 16 heads of 80, 284 MB peak against
2.4 GB, 1.9x faster; README, "At real size").

Per attention block, in the exported graph: ``MatMul(q, Transpose(k, perm=[0,1,3,2]))``, an optional scale (``Mul``
or ``Div`` by a constant scalar), optional ``Cast`` nodes around a last-axis ``Softmax``, and ``MatMul(probs, v)``
with q, k, v of shape ``[batch, heads, N, head_dim]``. A block with anything else on the scores (an additive mask,
dropout) is left as it is. The rewrite: q, k and v go to ``[batch, N, heads * head_dim]`` (Transpose + Reshape),
one MultiHeadAttention node with ``num_heads`` and the graph's own scale, and back to ``[batch, heads, N,
head_dim]`` under the name the old ``MatMul(probs, v)`` output had, so everything after it is unchanged (ONNX
Runtime's transpose optimizer cancels the transposes that meet their inverse).

The weights are not loaded: the rewritten graph keeps referring to the source's external data file.
"""

from __future__ import annotations

from pathlib import Path

from .edges import tensor_edges

MHA = "MultiHeadAttention"
_CASTS = ("Cast",)


class VisionAttentionError(ValueError):
    """The vision graph's attention does not have the shape this pass rewrites."""


def fuse_vision_attention(src: Path, dst: Path, num_heads: int, head_dim: int) -> int:
    """Rewrite ``src`` into ``dst`` beside it (``dst`` names ``src``'s weights file). Returns the number of
    attention blocks replaced; 0 means ``dst`` was not written (nothing matched)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    src, dst = Path(src), Path(dst)
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError("fuse_vision_attention writes beside its source: the weights file is shared, not copied")
    m = onnx.load(str(src), load_external_data=False)
    g = m.graph
    producer, consumers = tensor_edges(g)
    inits = {i.name: i for i in g.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in g.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}

    def scalar(name: str) -> float | None:
        t = constants.get(name)
        if t is None and name in inits and not any(e.key == "location" for e in inits[name].external_data):
            t = inits[name]
        if t is None:
            return None
        a = numpy_helper.to_array(t)
        return float(a.reshape(-1)[0]) if a.size == 1 else None

    def single(name: str, op: str):
        """The one node reading ``name`` if it is an ``op``, else None."""
        readers = consumers.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op else None

    def rank4(name: str) -> bool:
        shape = shapes.get(name)
        return shape is None or len(shape) == 4

    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value or d.dim_param or None for d in vi.type.tensor_type.shape.dim]

    removed, replacements = set(), []  # replacements: (index of the old output MatMul, new nodes)
    for softmax in [n for n in g.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        if axis not in (-1, 3):
            continue
        chain = [softmax]
        # after: [Cast] -> MatMul(probs, v)
        out = softmax.output[0]
        after = single(out, "Cast")
        if after is not None:
            chain.append(after)
            out = after.output[0]
        pv = single(out, "MatMul")
        if pv is None or pv.input[0] != out:
            continue
        # before: [Cast] <- [Mul | Div by a scalar] <- [Cast] <- MatMul(q, Transpose(k))
        scale, cur = 1.0, softmax.input[0]
        node = producer.get(cur)
        if node is not None and node.op_type in _CASTS and len(consumers.get(cur, [])) == 1:
            chain.append(node)
            cur = node.input[0]
            node = producer.get(cur)
        if node is not None and node.op_type in ("Mul", "Div") and len(consumers.get(cur, [])) == 1:
            value = scalar(node.input[1])
            if value is None or value == 0:
                continue
            scale = value if node.op_type == "Mul" else 1.0 / value
            chain.append(node)
            cur = node.input[0]
            node = producer.get(cur)
        if node is not None and node.op_type in _CASTS and len(consumers.get(cur, [])) == 1:
            chain.append(node)
            cur = node.input[0]
            node = producer.get(cur)
        if node is None or node.op_type != "MatMul" or len(consumers.get(cur, [])) != 1:
            continue
        qk = node
        kt = producer.get(qk.input[1])
        if kt is None or kt.op_type != "Transpose":
            continue
        perm = next((list(a.ints) for a in kt.attribute if a.name == "perm"), None)
        if perm not in ([0, 1, 3, 2], [0, 2, 3, 1]):  # k as [b, h, n, d], or [b, n, h, d] (two transposes folded)
            continue
        operands = {"q": (qk.input[0], "bhnd"), "k": (kt.input[0], "bhnd" if perm == [0, 1, 3, 2] else "bnhd"),
                    "v": (pv.input[1], "bhnd")}
        if not all(rank4(t) for t, _ in operands.values()) or any(
                (shapes.get(t) or [None] * 4)[1 if lay == "bhnd" else 2] not in (None, num_heads) or
                (shapes.get(t) or [None] * 4)[3] not in (None, head_dim) for t, lay in operands.values()):
            continue
        chain += [qk, pv]
        if len(consumers.get(kt.output[0], [])) == 1:
            chain.append(kt)
        tag = f"vision_mha_{len(replacements)}"
        new = []
        flat = {}
        for role, (t, layout) in operands.items():
            before = producer.get(t)
            if layout == "bhnd" and before is not None and before.op_type == "Transpose" and next(
                    (list(a.ints) for a in before.attribute if a.name == "perm"), None) == [0, 2, 1, 3]:
                t, layout = before.input[0], "bnhd"  # the exporter's own [b, n, h, d] view: no transpose back
                if len(consumers.get(before.output[0], [])) == 1:
                    chain.append(before)
            if layout == "bhnd":
                new.append(helper.make_node("Transpose", [t], [f"{tag}_{role}_bnhd"], perm=[0, 2, 1, 3],
                                            name=f"{tag}/{role}_transpose"))
                t = f"{tag}_{role}_bnhd"
            new.append(helper.make_node("Reshape", [t, f"{tag}_flat_shape"], [f"{tag}_{role}"],
                                        name=f"{tag}/{role}_reshape"))
            flat[role] = f"{tag}_{role}"
        new.insert(0, helper.make_node("Constant", [], [f"{tag}_flat_shape"], name=f"{tag}/flat_shape",
                                       value=numpy_helper.from_array(np.array([0, 0, -1], np.int64))))
        new.insert(1, helper.make_node("Constant", [], [f"{tag}_heads_shape"], name=f"{tag}/heads_shape",
                                       value=numpy_helper.from_array(np.array([0, 0, num_heads, head_dim],
                                                                              np.int64))))
        new.append(helper.make_node(MHA, [flat["q"], flat["k"], flat["v"]], [f"{tag}_out"], name=f"{tag}/attention",
                                    domain="com.microsoft", num_heads=num_heads, scale=float(scale)))
        new.append(helper.make_node("Reshape", [f"{tag}_out", f"{tag}_heads_shape"], [f"{tag}_out_bnhd"],
                                    name=f"{tag}/out_reshape"))
        new.append(helper.make_node("Transpose", [f"{tag}_out_bnhd"], [pv.output[0]], perm=[0, 2, 1, 3],
                                    name=f"{tag}/out_transpose"))
        removed.update(id(n) for n in chain)
        replacements.append((pv, new))
    if not replacements:
        return 0
    at = {id(pv): new for pv, new in replacements}
    nodes = []
    for n in g.node:
        if id(n) in at:
            nodes.extend(at[id(n)])
        elif id(n) not in removed:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    made = {o for n in g.node for o in n.output}
    kept = [vi for vi in g.value_info if vi.name in made]
    del g.value_info[:]
    g.value_info.extend(kept)
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for attr in (a for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH):
        read |= {i for n in attr.g.node for i in n.input}  # subgraphs may read the outer graph's constants
    unused = [i for i in g.initializer if i.name not in read]  # the scales that went into the attention nodes
    for init in unused:
        g.initializer.remove(init)
    if not any(op.domain == "com.microsoft" for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, str(dst))
    return len(replacements)
