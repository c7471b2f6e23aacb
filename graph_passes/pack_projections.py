"""Pack each attention layer's q, k and v ``MatMulNBits`` into one (ONNX Runtime int4 decoders).

Three block-quantized projections of the same input become one ``MatMulNBits`` whose weight rows are q's, k's and
v's in that order, followed by a ``Split`` into the three outputs the graph had. Every output column is computed
from exactly the same blocks as before (blocks run along K; packing stacks along N), so the result is bit-identical;
what changes is one kernel call and one quantization of the activations instead of three. The GroupQueryAttention
rewrite (``group_query_attention.py``) then feeds the packed output to the op directly where the rotary embedding
is inside it, which is how ONNX Runtime GenAI's builder lays out its decoders.

Only projections without a bias, with identical attributes (K, bits, block size, accuracy level) and no zero points
or group indices are packed; anything else is left as it is. The weights file is rewritten (the packed initializers
replace the three), so the eager decoder and its GroupQueryAttention variant keep sharing one file; it is rewritten
tensor by tensor (one layer's three projections in memory at a time).
"""

from __future__ import annotations

from pathlib import Path

from .edges import tensor_edges

PACKED_SUFFIX = "_qkv_packed"


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def pack_qkv(path: Path, num_heads: int, kv_heads: int, head_dim: int) -> int:
    """Rewrite ``path`` (and its external data file) in place; returns the number of layers packed."""
    import numpy as np
    import onnx
    from onnx import external_data_helper, helper, numpy_helper

    from .io import load_model

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)  # the weights stay on disk; three are read per layer
    side = path.with_name(path.name + ".packed")  # the packed tensors, written as they are made
    side_file = side.open("wb")
    g = model.graph
    _, consumers = tensor_edges(g)
    inits = {i.name: i for i in g.initializer}
    sizes = [num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    by_input: dict[str, list] = {}
    for n in g.node:
        if n.op_type == "MatMulNBits" and len([i for i in n.input if i]) == 3 and n.input[1] in inits:
            by_input.setdefault(n.input[0], []).append(n)
    def role(node) -> str | None:
        """'key' / 'value' if the projection's output reaches ``present.*.key`` / ``.value`` without passing a
        matmul (the rotary embedding is on the way for keys), 'query' if it reaches neither."""
        seen, todo = set(), [node.output[0]]
        while todo:
            t = todo.pop()
            if t.startswith("present.") and t.endswith((".key", ".value")):
                return t.rpartition(".")[2]
            for c in consumers.get(t, []):
                if c.op_type not in ("MatMul", "MatMulNBits", "Softmax") and id(c) not in seen:
                    seen.add(id(c))
                    todo.extend(c.output)
        return "query"

    packed = 0
    for a, nodes in by_input.items():
        if len(nodes) != 3:
            continue
        roles = {role(n): n for n in nodes}
        if set(roles) != {"query", "key", "value"}:
            continue
        trio = [roles["query"], roles["key"], roles["value"]]
        if [int(_attrs(n)["N"]) for n in trio] != sizes:
            continue
        attrs = [_attrs(n) for n in trio]
        same = {key: {str(at.get(key)) for at in attrs} for key in ("K", "bits", "block_size", "accuracy_level")}
        if any(len(v_) != 1 for v_ in same.values()):
            continue
        if not all(c.op_type in ("Reshape", "Transpose") for n in trio for c in consumers.get(n.output[0], [])):
            continue  # a bias Add (or anything else) after a projection: leave the layer as it is
        weights = [numpy_helper.to_array(inits[n.input[1]], base_dir=str(path.parent)) for n in trio]
        scales = [numpy_helper.to_array(inits[n.input[2]], base_dir=str(path.parent)) for n in trio]
        name = trio[0].name + PACKED_SUFFIX
        for array, suffix in ((np.concatenate(weights, 0), "B"), (np.concatenate(scales, 0), "scales")):
            t = numpy_helper.from_array(array, f"{name}.{suffix}")
            offset = side_file.tell()
            side_file.write(t.raw_data)
            external_data_helper.set_external_data(t, side.name, offset=offset, length=array.nbytes)
            t.ClearField("raw_data")
            g.initializer.append(t)
        del weights, scales
        at = dict(attrs[0])
        at["N"] = sum(sizes)
        pack = helper.make_node("MatMulNBits", [a, f"{name}.B", f"{name}.scales"], [f"{name}.out"], name=name,
                                domain="com.microsoft", **at)
        split = helper.make_node("Split", [f"{name}.out", f"{name}.sizes"], [n.output[0] for n in trio],
                                 name=f"{name}.split", axis=-1)
        g.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), f"{name}.sizes"))
        at_index = min(list(g.node).index(n) for n in trio)
        for n in trio:
            g.node.remove(n)
        g.node.insert(at_index, split)
        g.node.insert(at_index, pack)
        packed += 1
    side_file.close()
    if not packed:
        side.unlink()
        return 0
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    # the graph now names the old weights file (minus the three projections) and the side file: onnx_ir writes one
    # weights file from both, tensor by tensor, in a private directory; then it replaces the old pair
    import os
    import shutil
    import tempfile

    from .io import save_model

    onnx.save(model, str(path))
    work = Path(tempfile.mkdtemp(prefix=".pack-", dir=path.parent))
    try:
        save_model(load_model(path), work / path.name)
        for f in (path.name, path.name + ".data"):
            os.replace(work / f, path.parent / f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        side.unlink(missing_ok=True)
    return packed
