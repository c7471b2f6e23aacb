"""The hooks edit exactly the planned rows with exactly scale*h + weight*h[donor], at every layer of the range only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scr_export.processing import encode
from scr_export.redistribution import Redistribution
from scr_export.reference import plan_for_inputs


def _capture_layers(vlm, tensors, redistribution=None):
    """Each decoder layer's (args, kwargs) and final output, observed after every other hook."""
    seen = {}
    handles = []
    for i, layer in enumerate(vlm.decoder_layers()):
        def pre(module, args, kwargs, i=i):
            seen.setdefault(i, {})["in"] = (tuple(a.clone() if torch.is_tensor(a) else a for a in args), dict(kwargs))

        def post(module, args, kwargs, output, i=i):
            h = output[0] if isinstance(output, tuple) else output
            seen[i]["out"] = h.clone()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            if redistribution is None:
                vlm.model(**vlm.forward_inputs(tensors), use_cache=False)
            else:
                with redistribution:
                    vlm.model(**vlm.forward_inputs(tensors), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_hooks_apply_the_formula_at_every_layer_in_range_and_nowhere_else(vlm, image):
    inputs = encode(vlm, [[image]], ["Where is the red block?"])
    cfg = vlm.scr_config(layers=(0, 1))
    plan = plan_for_inputs(vlm, inputs, cfg)
    red = Redistribution(vlm, plan, cfg)
    seen = _capture_layers(vlm, inputs.tensors, red)
    layers = vlm.decoder_layers()
    active = plan.active()[0]
    assert active.sum() > cfg.k
    for i, layer in enumerate(layers):
        args, kwargs = seen[i]["in"]
        with torch.no_grad():
            raw = layer.forward(*args, **kwargs)  # .forward bypasses all hooks: the un-hooked output
        raw = (raw[0] if isinstance(raw, tuple) else raw)[0].numpy().astype(np.float64)
        got = seen[i]["out"][0].numpy().astype(np.float64)
        if i in cfg.layer_indices():
            want = plan.scale[0][:, None] * raw + plan.weight[0][:, None] * raw[plan.donor[0]]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(got[~active], raw[~active])  # untouched rows are bit-identical
            assert not np.allclose(got[active], raw[active])
        else:
            np.testing.assert_array_equal(got, raw)
    assert red.calls == {i: 1 for i in cfg.layer_indices()}


def test_hooks_are_removed_even_on_error(vlm, image):
    inputs = encode(vlm, [[image]], ["Where?"])
    cfg = vlm.scr_config()
    plan = plan_for_inputs(vlm, inputs, cfg)
    layers = vlm.decoder_layers()
    before = [len(l._forward_hooks) for l in layers]
    with pytest.raises(RuntimeError, match="boom"):
        with Redistribution(vlm, plan, cfg):
            assert [len(l._forward_hooks) for l in layers] != before
            raise RuntimeError("boom")
    assert [len(l._forward_hooks) for l in layers] == before


def test_active_plan_refuses_a_kv_decode_step(vlm, image):
    inputs = encode(vlm, [[image]], ["Where?"])
    cfg = vlm.scr_config()
    plan = plan_for_inputs(vlm, inputs, cfg)
    with Redistribution(vlm, plan, cfg), torch.no_grad():
        with pytest.raises(RuntimeError, match="decode step must run with the plan inactive"):
            vlm.model(input_ids=inputs.input_ids[:, -1:], attention_mask=inputs.attention_mask[:, -1:],
                      position_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=False)


def test_layer_states_with_scr_differ_at_and_after_the_scr_layers_and_equal_them_before(vlm, image):
    """What `validate --per-layer` compares: the reference's per-layer states with SCR equal those without it
    before the first SCR layer (bit for bit) and differ at it and after it (so a runtime that ignored SCR could not
    pass the per-layer check by agreeing with a reference that ignored it too)."""
    from scr_export.reference import layer_states

    inputs = encode(vlm, [[image]], ["Where is the red block?"])
    cfg = vlm.scr_config(layers=(1, 2))
    on = layer_states(vlm, inputs, scr=True, config=cfg)
    off = layer_states(vlm, inputs, scr=False, config=cfg)
    assert on.shape == off.shape and on.shape[0] == vlm.num_layers >= 4
    np.testing.assert_array_equal(on[0], off[0])
    for i in range(1, vlm.num_layers):
        assert not np.allclose(on[i], off[i], atol=1e-6), f"layer {i}: SCR left no trace"


def test_the_onnx_runner_layer_states_carry_scr_and_an_identity_plan_is_scr_off(converted, image):
    """The deployed graph's per-layer states: with SCR they differ from SCR off at every layer from the first SCR
    layer on, equal the reference's (same plan), and the identity plan gives exactly the SCR-off states."""
    from conftest import load
    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.plan import SequencePlan
    from scr_export.reference import layer_states

    runner = OrtVLM(converted("llava")[0])
    vlm = load("tiny-llava")
    inputs = runner.encode([[image]], ["Where is the red block?"])
    cfg = runner.config
    plan = plan_for_inputs(vlm, encode(vlm, [[image]], ["Where is the red block?"]), cfg)
    on = runner.layer_states(inputs, scr=True, plan=plan, config=cfg)
    off = runner.layer_states(inputs, scr=False, config=cfg)
    ident = runner.layer_states(inputs, scr=True, plan=SequencePlan.identity(*inputs.shape), config=cfg)
    np.testing.assert_array_equal(ident, off)
    first = cfg.layer_indices()[0]
    for i in range(first, on.shape[0]):
        assert not np.allclose(on[i], off[i], atol=1e-6), f"layer {i}: SCR left no trace in the graph"
    want = layer_states(vlm, encode(vlm, [[image]], ["Where is the red block?"]), scr=True, plan=plan,
                        config=cfg)
    np.testing.assert_allclose(on, want, rtol=1e-4, atol=1e-4)
