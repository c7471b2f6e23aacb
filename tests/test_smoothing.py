"""SmoothQuant on the MLP down projection (graph_passes/smoothing.py) and the per-channel statistics it needs
(calibration/ranges.py): the float function is unchanged, the weights move by the scales SmoothQuant defines, a shared
weights file is edited once, and bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxruntime  # noqa: F401  (installed by the README's test command)

from graph_passes.smoothing import down_projections, scales, smooth, weight_absmax
from scr_export.errors import SCRExportError

HIDDEN, INTER = 8, 16


def _mlp_graph(tmp: Path, rng: np.random.Generator, outlier: float = 60.0) -> tuple[Path, dict, dict]:
    """x -> gate / up MatMuls -> silu(gate) * up -> down MatMul, weights in an external file; an up column with a
    large scale gives the down input an outlier channel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    wg = rng.normal(0, 0.3, (HIDDEN, INTER)).astype(np.float32)
    wu = rng.normal(0, 0.3, (HIDDEN, INTER)).astype(np.float32)
    wu[:, 3] *= outlier
    wd = rng.normal(0, 0.3, (INTER, HIDDEN)).astype(np.float32)
    inits = [numpy_helper.from_array(w, n) for w, n in ((wg, "w_gate"), (wu, "w_up"), (wd, "w_down"))]
    nodes = [helper.make_node("MatMul", ["x", "w_gate"], ["g"], name="gate"),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
             helper.make_node("MatMul", ["x", "w_up"], ["u"], name="up"),
             helper.make_node("Mul", ["silu", "u"], ["act"], name="act_mul"),
             helper.make_node("MatMul", ["act", "w_down"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, HIDDEN]),
                               helper.make_tensor_value_info("act", TensorProto.FLOAT, [None, INTER])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp / "mlp.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="mlp.onnx.data",
              size_threshold=0)
    linear = {n: {"layer": 0, "lm_head": False, "activation": a, "weight": w}
              for n, a, w in (("gate", "x", "w_gate"), ("up", "x", "w_up"), ("down", "act", "w_down"))}
    return path, linear, {"w_gate": wg, "w_up": wu, "w_down": wd}


def _run(path: Path, x: np.ndarray):
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y", "act"], {"x": x})


def test_smoothing_keeps_the_function_and_moves_the_outlier_into_the_weights(tmp_path):
    import onnx

    rng = np.random.default_rng(0)
    path, linear, w = _mlp_graph(tmp_path, rng)
    x = rng.normal(0, 1, (64, HIDDEN)).astype(np.float32)
    y0, act0 = _run(path, x)
    a = np.abs(act0).max(0)
    assert a[3] > 10 * np.median(a)  # the outlier channel the graph was built with
    nodes_before = [(n.op_type, list(n.input), list(n.output)) for n in onnx.load(str(path)).graph.node]

    record = smooth(path, linear, {"act": a}, 0.5)
    y1, act1 = _run(path, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-5)  # the same function
    s = np.sqrt(a) / np.sqrt(np.abs(w["w_down"]).max(1))  # SmoothQuant's s_j at alpha 0.5, by hand
    np.testing.assert_allclose(np.abs(act1).max(0), a / s, rtol=1e-4)
    m = onnx.load(str(path))
    got = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    np.testing.assert_allclose(got["w_down"], w["w_down"] * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(got["w_up"], w["w_up"] / s[None, :], rtol=1e-5)
    np.testing.assert_array_equal(got["w_gate"], w["w_gate"])
    assert [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node] == nodes_before  # no node added
    after = np.abs(act1).max(0)
    assert after.max() / np.median(after) < a.max() / np.median(a) / 3  # the outlier is tamed
    assert record["0"]["act_max_over_median_after"] < record["0"]["act_max_over_median_before"]


def test_a_weights_file_two_graphs_share_is_smoothed_once(tmp_path):
    rng = np.random.default_rng(1)
    path, linear, w = _mlp_graph(tmp_path, rng)
    x = rng.normal(0, 1, (16, HIDDEN)).astype(np.float32)
    y0, act0 = _run(path, x)
    a = np.abs(act0).max(0)
    done: set = set()
    smooth(path, linear, {"act": a}, 0.5, done=done)
    second = smooth(path, linear, {"act": a}, 0.5, done=done)  # e.g. the diagnostic graph on the same file
    assert "shared" in second["0"]
    np.testing.assert_allclose(_run(path, x)[0], y0, rtol=1e-4, atol=1e-5)  # applied once: still the same function


def test_smoothing_scales_and_refusals(tmp_path):
    s = scales(np.array([4.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.25]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 2.0])  # sqrt(4)/sqrt(1); never active -> 1; sqrt(1)/sqrt(0.25)
    with pytest.raises(SCRExportError, match="outside"):
        scales(np.ones(2), np.ones(2), 1.0)
    rng = np.random.default_rng(2)
    path, linear, _ = _mlp_graph(tmp_path, rng)
    no_mlp = {k: v for k, v in linear.items() if k != "up"}
    with pytest.raises(SCRExportError, match="no MLP down projection"):
        smooth(path, no_mlp, {"act": np.ones(INTER)}, 0.5)
    import onnx

    pairs = down_projections(onnx.load(str(path), load_external_data=False), linear)
    assert [(p.down, p.up, p.activation) for p in pairs] == [("down", "up", "act")]
    np.testing.assert_allclose(weight_absmax(path, pairs)["down"],
                               np.abs(onnx.numpy_helper.to_array(
                                   {t.name: t for t in onnx.load(str(path)).graph.initializer}["w_down"])).max(1))


def test_channel_statistics_are_the_per_channel_maxima_over_every_feed(tmp_path):
    from calibration.ranges import channel_absmax

    rng = np.random.default_rng(3)
    path, _, _ = _mlp_graph(tmp_path, rng)
    samples = [[{"x": rng.normal(0, 1, (n, HIDDEN)).astype(np.float32)} for n in (5, 1, 1)] for _ in range(3)]

    class Feeds:  # the reader's interface: each sample's feeds (prefill, then decode steps)
        def per_sample(self):
            yield from samples

    got = channel_absmax(path, Feeds(), {"act": INTER})
    acts = [np.abs(_run(path, f["x"])[1]).max(0) for s in samples for f in s]
    np.testing.assert_allclose(got["act"], np.max(acts, axis=0), rtol=1e-6)
    assert not list(tmp_path.glob(".smoothing-*"))  # the augmented graph is removed


def test_bad_smoothing_settings_are_refused_before_any_work():
    from calibration.quantize import QuantizeSpec

    with pytest.raises(SCRExportError, match="--smooth-alpha 1.5"):
        QuantizeSpec("int8", smooth_alpha=1.5).check(lambda m: None)
    with pytest.raises(SCRExportError, match="weight-only"):
        QuantizeSpec("int4", smooth_alpha=0.5).check(lambda m: None)
    assert QuantizeSpec("int4").check(lambda m: None).smooth_alpha is None
    assert QuantizeSpec("fp8", smooth_alpha=0).check(lambda m: None).smooth_alpha is None
