"""Replace the decoder's eager attention by ONNX Runtime's ``com.microsoft::GroupQueryAttention`` with a shared KV
buffer (ONNX Runtime only; TensorRT and the diagnostic graph keep eager attention).

The exported decoder computes ``present = Concat(past, new)`` at every step: a copy of the whole KV cache per token,
32 % of an int4 decode step on small-llava. GroupQueryAttention writes the new rows into a preallocated buffer that
is both ``past`` and ``present`` (bound to the same memory by the runner), and does the head grouping, the causal
mask and the softmax itself. Rotary embeddings (M-RoPE included) and q/k norms stay where the exporter put them:
the op receives the rotated q and k.

Per layer, in the exported graph: ``present.i.key = Concat(past_key_values.i.key, k_rot)`` and likewise for the value;
the attention MatMul reading the (expanded) key gives q_rot, and the Reshape after ``MatMul(probs, value)`` is the
attention output. Those are rewired to one GroupQueryAttention node; what fed only them is removed.

New decoder inputs: ``seqlens_k`` int32 [batch] (valid tokens − 1) and ``total_sequence_length`` int32 scalar.
Padding is not modelled (the op assumes right padding): the runner uses these graphs for one prompt at a time.

With ``rotary=(cos_cache, sin_cache)`` (``[max_positions, head_dim / 2]``, the model's own rotary tables) the rotary
embedding moves into the op too (``do_rotary=1``): each layer's ``q·cos + rotate_half(q)·sin`` (and k's) is matched
and the op gets the unrotated q and k, straight from their projections where the graph allows, so the Slice, Neg,
Concat, Mul, Add, Transpose and Reshape nodes around attention go. The op rotates position ``past + i``: right for
1-D positions without padding (LLaVA, InternVL2, Chameleon for one prompt), wrong for Qwen2-VL's M-RoPE, whose
caller must not ask for it.
"""

from __future__ import annotations

import math
from pathlib import Path

from .edges import tensor_edges

SEQLENS = "seqlens_k"
TOTAL = "total_sequence_length"
_THROUGH = ("Unsqueeze", "Expand", "Reshape", "Transpose")
_PROJECTIONS = ("MatMul", "MatMulNBits")


class AttentionPatternError(ValueError):
    """The decoder's attention does not have the shape this pass rewrites."""


def fuse_group_query_attention(src: Path, dst: Path, num_layers: int, num_heads: int, kv_heads: int,
                               head_dim: int, rotary=None) -> int:
    """Rewrite ``src`` into ``dst`` (the weights file stays ``src``'s, named in ``dst``'s external data: write
    ``dst`` beside it). Returns the number of attention blocks replaced (= num_layers). ``rotary``: see above;
    an ``AttentionPatternError`` if a layer's rotary embedding is not the pattern the op computes."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    m = onnx.load(str(src), load_external_data=False)
    g = m.graph
    if any(i.name == SEQLENS for i in g.input):
        raise AttentionPatternError(f"{Path(src).name} already has GroupQueryAttention inputs")
    producer, consumers = tensor_edges(g)
    inits = {i.name: i for i in g.initializer}
    removed, added = set(), []
    constant_nodes = {n.output[0]: n.attribute[0].t for n in g.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}

    def const(name: str):
        """A constant's value (initializers may live in the external data file beside ``src``)."""
        if name in constant_nodes:
            return numpy_helper.to_array(constant_nodes[name])
        if name in inits:
            return numpy_helper.to_array(inits[name], base_dir=str(Path(src).parent))
        return None

    def reach(name: str, target: str):
        for c in consumers.get(name, []):
            if c.op_type == target:
                return c
            if c.op_type in _THROUGH:
                found = reach(c.output[0], target)
                if found is not None:
                    return found
        return None

    def only(name: str, op: str):
        cs = [c for c in consumers.get(name, []) if c.op_type == op]
        if len(cs) != 1:
            raise AttentionPatternError(f"expected one {op} after {name}, found {len(cs)}")
        return cs[0]

    def single(name: str, op: str):
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    def unrotated(rot: str):
        """x for ``rot = Add(Mul(x, cos), Mul(Concat(Neg(Slice(x)), Slice(x)), sin))``, else an error."""
        add = single(rot, "Add")
        muls = [single(i, "Mul") for i in add.input] if add is not None else []
        if len(muls) != 2 or None in muls:
            raise AttentionPatternError(f"{rot} is not q·cos + rotate_half(q)·sin")
        for m_cos, m_sin in (muls, muls[::-1]):
            for cat_in in m_sin.input:
                cat = single(cat_in, "Concat")
                if cat is None or len(cat.input) != 2:
                    continue
                neg, tail = single(cat.input[0], "Neg"), single(cat.input[1], "Slice")
                head = single(neg.input[0], "Slice") if neg is not None else None
                if head is None or tail is None or head.input[0] != tail.input[0]:
                    continue
                x = head.input[0]
                starts = const(head.input[1]), const(tail.input[1])
                if x in m_cos.input and None not in starts and \
                        int(np.asarray(starts[0]).reshape(-1)[0]) == head_dim // 2 and \
                        int(np.asarray(starts[1]).reshape(-1)[0]) == 0:
                    return x
        raise AttentionPatternError(f"{rot} is not q·cos + rotate_half(q)·sin over the whole head")

    def reshaped(x: str):
        """(t, shape) for x = Transpose[0, 2, 1, 3](Reshape(t, shape)), the [B, heads, S, D] view of a [B, S, heads·D]
        tensor; (None, None) otherwise."""
        t = single(x, "Transpose")
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None) if t is not None else None
        r = single(t.input[0], "Reshape") if perm == [0, 2, 1, 3] else None
        return (r.input[0], const(r.input[1])) if r is not None else (None, None)

    def projection(name: str | None):
        """The MatMul / MatMulNBits producing ``name``, through a bias Add (not a norm's last Add)."""
        source = producer.get(name) if name is not None else None
        if source is not None and source.op_type == "Add":
            source = next((producer[i] for i in source.input if i in producer
                           and producer[i].op_type in _PROJECTIONS), None)
        return source if source is not None and source.op_type in _PROJECTIONS else None

    def flat(x: str, tag: str, layer: int) -> str:
        t = helper.make_node("Transpose", [x], [f"gqa_{layer}_{tag}_bshd"], perm=[0, 2, 1, 3],
                             name=f"gqa_{layer}_{tag}_t")
        r = helper.make_node("Reshape", [t.output[0], "gqa_flat_shape"], [f"gqa_{layer}_{tag}"],
                             name=f"gqa_{layer}_{tag}_r")
        added.extend([t, r])
        return r.output[0]

    def bsd(x: str, tag: str, layer: int) -> str:
        """[B, S, heads·D] for x = [B, heads, S, D]: the projection output itself where x is its reshaped view."""
        raw, shape = reshaped(x)
        if projection(raw) is not None and (shape is None or (len(shape) == 4 and int(shape[-1]) == head_dim)):
            return raw  # straight from the projection (and its bias)
        return flat(x, tag, layer)

    def packed_split(xs):
        """The Split of one packed q/k/v projection whose outputs are, in order, what q, k and v reshape."""
        raws = [reshaped(x)[0] for x in xs]
        split = single(raws[0], "Split") if raws[0] is not None else None
        if split is None or list(split.output) != raws:
            return None
        return split if projection(split.input[0]) is not None else None

    g.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "gqa_flat_shape"))
    rotary_inputs: list[str] = []
    if rotary is not None:
        cos, sin = (np.ascontiguousarray(c) for c in rotary)  # in the graph's float type (the op's T)
        if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != head_dim // 2:
            raise ValueError(f"rotary caches must be [positions, {head_dim // 2}], got {cos.shape}")
        g.initializer.extend([numpy_helper.from_array(cos, "gqa_cos_cache"),
                              numpy_helper.from_array(sin, "gqa_sin_cache")])
        rotary_inputs = ["gqa_cos_cache", "gqa_sin_cache"]
    for i in range(num_layers):
        ck, cv = producer.get(f"present.{i}.key"), producer.get(f"present.{i}.value")
        if ck is None or cv is None or ck.op_type != "Concat" or cv.op_type != "Concat":
            raise AttentionPatternError(f"layer {i}: present.{i}.key/value are not Concat(past, new)")
        scores = reach(f"present.{i}.key", "MatMul")
        context = reach(f"present.{i}.value", "MatMul")
        if scores is None or context is None:
            raise AttentionPatternError(f"layer {i}: no attention MatMul reads the key/value cache")
        scale_mul = next((c for c in consumers.get(scores.output[0], []) if c.op_type in ("Mul", "Div")), None)
        scale = 1.0 / math.sqrt(head_dim)
        value = const(scale_mul.input[1]) if scale_mul is not None else None
        if value is not None and np.asarray(value).size == 1:
            v = float(np.asarray(value).reshape(-1)[0])
            scale = v if scale_mul.op_type == "Mul" else 1.0 / v
        out = only(only(context.output[0], "Transpose").output[0], "Reshape")

        if rotary is None:
            xs = scores.input[0], ck.input[1], cv.input[1]
        else:
            xs = unrotated(scores.input[0]), unrotated(ck.input[1]), cv.input[1]
        split = packed_split(xs) if rotary is not None else None
        if split is not None:  # q, k, v packed in one projection (pack_projections.py): the op unpacks them
            q, k, v = split.input[0], "", ""
        else:
            q, k, v = bsd(xs[0], "q", i), bsd(xs[1], "k", i), bsd(xs[2], "v", i)
        extra = {"do_rotary": 1, "rotary_interleaved": 0} if rotary is not None else {}
        added.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, ck.input[0], cv.input[0], SEQLENS, TOTAL] + rotary_inputs,
            [out.output[0], f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
            name=f"gqa_{i}", num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, **extra))
        removed.update({id(ck), id(cv), id(out)})
    kept = [n for n in g.node if id(n) not in removed]
    del g.node[:]
    g.node.extend(kept + added)
    g.input.extend([helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]),
                    helper.make_tensor_value_info(TOTAL, TensorProto.INT32, [])])
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model = ir.from_proto(m)
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    left = [n for n in model.graph if n.op_type == "Softmax"]
    if left:
        raise AttentionPatternError(f"{len(left)} eager Softmax nodes are left after the rewrite")
    onnx.save(ir.to_proto(model), str(dst))
    return num_layers
