"""The standard-op function body of scr::SCRNeighbourInject against the numpy reference of SCR.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnx as onnx  # noqa: E402  (installed by the README's test command)
import onnxruntime as ort  # noqa: E402  (installed by the README's test command)
import onnx_ir as ir  # noqa: E402  (installed by the README's test command)

from graph_passes import reference, standalone_model  # noqa: E402
from scr_export import SCRConfig, plan_redistribution  # noqa: E402

_SESSIONS = {}


def session(dtype):
    if dtype not in _SESSIONS:
        proto = ir.to_proto(standalone_model(dtype))
        onnx.checker.check_model(proto, full_check=True)
        _SESSIONS[dtype] = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return _SESSIONS[dtype]


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 20), d=st.integers(1, 16), seed=st.integers(0, 2**31),
       dtype=st.sampled_from(["float32", "float16"]))
def test_function_body_matches_reference_on_random_plans(b, t, d, seed, dtype):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((b, t, d)).astype(dtype)
    donor = rng.integers(0, t, (b, t))  # arbitrary, with many duplicate donors
    scale = rng.uniform(0.5, 1.5, (b, t)).astype(np.float32)
    weight = rng.uniform(0.0, 0.5, (b, t)).astype(np.float32)
    out = session(dtype).run(None, {"hidden": hidden, "donor": donor, "scale": scale, "weight": weight})[0]
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    np.testing.assert_array_equal(out, reference(hidden, donor, scale, weight))


def test_real_plan_with_borders_and_a_batch_matches_the_plan_apply():
    rng = np.random.default_rng(1)
    rows, cols, prefix = 6, 7, 3
    t = prefix + rows * cols + 4
    donor = np.tile(np.arange(t), (2, 1))
    scale = np.ones((2, t), np.float32)
    weight = np.zeros((2, t), np.float32)
    for row in range(2):
        plan = plan_redistribution(rng.random(rows * cols), (rows, cols), SCRConfig(k=6))
        donor[row, prefix:prefix + rows * cols] = prefix + plan.donor
        scale[row, prefix:prefix + rows * cols] = plan.scale
        weight[row, prefix:prefix + rows * cols] = plan.weight
    hidden = rng.standard_normal((2, t, 32)).astype(np.float32)
    out = session("float32").run(None, {"hidden": hidden, "donor": donor, "scale": scale, "weight": weight})[0]
    np.testing.assert_array_equal(out, reference(hidden, donor, scale, weight))
    untouched = (scale == 1) & (weight == 0)
    np.testing.assert_array_equal(out[untouched], hidden[untouched])
    assert not np.allclose(out[~untouched], hidden[~untouched])
