"""The vision graph's eager attention rewritten into ONNX Runtime's MultiHeadAttention (graph_passes/vision_attention):
what it matches, what it leaves alone, its numbers against numpy and against the eager graph, and the runner's use."""

from __future__ import annotations

import json

import numpy as np
import pytest

import onnx as onnx  # noqa: E402  (installed by the README's test command)
import onnxruntime as ort  # noqa: E402  (installed by the README's test command)

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graph_passes.vision_attention import MHA, fuse_vision_attention  # noqa: E402

H, D = 3, 8


def _attention_graph(path, *, scale_op="Mul", mask=False, k_layout="bhnd"):
    """softmax(q k^T * s) v over [1, H, N, D] inputs, the way the exporters write it."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2] if k_layout == "bhnd" else [0, 2, 3, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"])]
    inits = [numpy_helper.from_array(np.array(0.25 if scale_op == "Mul" else 4.0, np.float32), "s")]
    nodes.append(helper.make_node(scale_op, ["scores", "s"], ["scaled"]))
    last = "scaled"
    if mask:
        inits.append(numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "m"))
        nodes.append(helper.make_node("Add", ["scaled", "m"], ["masked"]))
        last = "masked"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"]),
              helper.make_node("Transpose", ["o"], ["y"], perm=[0, 2, 1, 3])]
    k_shape = [1, H, "n", D] if k_layout == "bhnd" else [1, "n", H, D]
    g = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, H, "n", D]),
                                               helper.make_tensor_value_info("k", TensorProto.FLOAT, k_shape),
                                               helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, H, "n", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", H, D])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _numpy_attention(q, k, v, scale):
    s = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("scale_op,k_layout", [("Mul", "bhnd"), ("Div", "bhnd"), ("Mul", "bnhd")])
def test_fused_attention_equals_numpy(tmp_path, scale_op, k_layout):
    src = _attention_graph(tmp_path / "a.onnx", scale_op=scale_op, k_layout=k_layout)
    assert fuse_vision_attention(src, tmp_path / "b.onnx", H, D) == 1
    fused = onnx.load(str(tmp_path / "b.onnx"))
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count(MHA) == 1 and "Softmax" not in ops and "s" not in {i.name for i in fused.graph.initializer}
    rng = np.random.default_rng(0)
    q, v = (rng.normal(size=(1, H, 50, D)).astype(np.float32) for _ in range(2))
    k = rng.normal(size=(1, H, 50, D)).astype(np.float32)
    feed_k = k if k_layout == "bhnd" else k.transpose(0, 2, 1, 3).copy()
    got = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"q": q, "k": feed_k, "v": v})[0]
    want = _numpy_attention(q, k, v, 0.25)
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_masked_or_mismatched_attention_is_left_alone(tmp_path):
    """An additive mask is something MultiHeadAttention would drop here: no rewrite, no file. Heads that disagree
    with the graph's shapes: no rewrite either."""
    masked = _attention_graph(tmp_path / "m.onnx", mask=True)
    assert fuse_vision_attention(masked, tmp_path / "m2.onnx", H, D) == 0 and not (tmp_path / "m2.onnx").exists()
    plain = _attention_graph(tmp_path / "p.onnx")
    assert fuse_vision_attention(plain, tmp_path / "p2.onnx", H + 1, D) == 0
    with pytest.raises(ValueError, match="beside its source"):
        fuse_vision_attention(plain, tmp_path / "elsewhere" / "p3.onnx", H, D)


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_vl"])
def test_converted_vision_graph_has_the_fused_twin(converted, family):
    """Every attention block of the exported vision tower is rewritten (one per exported layer), over the same
    weights file, and gives the eager graph's features within float32 rounding."""
    from scr_export.positions import vision_cu_seqlens, vision_positions

    out, _ = converted(family)
    info = json.loads((out / "manifest.json").read_text())["graphs"]["vision"]
    eager = onnx.load(str(out / info["file"]), load_external_data=False)
    fused = onnx.load(str(out / info["mha"]["file"]), load_external_data=False)
    softmaxes = sum(n.op_type == "Softmax" for n in eager.graph.node)
    assert softmaxes and info["mha"]["blocks"] == softmaxes
    assert sum(n.op_type == MHA for n in fused.graph.node) == softmaxes
    assert not any(n.op_type == "Softmax" for n in fused.graph.node)
    locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {info["file"] + ".data"}  # the eager graph's weights, not a copy
    assert not (out / (info["mha"]["file"] + ".data")).exists()
    rng = np.random.default_rng(1)
    if family == "qwen2_vl":
        thw = [1, 8, 12]
        feed = {"pixel_values": rng.normal(size=(96, 1176)).astype(np.float32),
                "vision_position_ids": vision_positions(thw, 2), "cu_seqlens": vision_cu_seqlens(thw)}
    else:
        s = ort.InferenceSession(str(out / info["file"]))
        shape = [2 if isinstance(d, str) else d for d in s.get_inputs()[0].shape]
        feed = {"pixel_values": rng.normal(size=shape).astype(np.float32)}
    a = ort.InferenceSession(str(out / info["file"])).run(None, feed)[0]
    b = ort.InferenceSession(str(out / info["mha"]["file"])).run(None, feed)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_runner_uses_the_fused_vision_graph_and_the_guard_knows(converted):
    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.memory_guard import estimate

    out, _ = converted("qwen2_vl")
    runner = OrtVLM(out, device="cpu")
    try:
        assert runner.family.vision_attention == "fused"
        grid = {"image_grid_thw": np.array([[1, 92, 68]])}
        fused = estimate(runner.family, grid)
        runner.family.vision_attention = "eager"
        eager = estimate(runner.family, grid)
        heads = runner.family.config.vision_config.num_heads
        width = runner.family.config.vision_config.embed_dim
        assert eager["bytes"] == 2 * heads * 6256**2 * 4 and eager["cost"][0] == "quadratic"
        assert fused["bytes"] == 4 * width * 6256 * 4 and "memory-efficient" in fused["what"]
    finally:
        runner.release()
