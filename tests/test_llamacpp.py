"""llama.cpp with SCR through the eval callback, against the PyTorch reference (float and dequantized weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[llamacpp]'")
pytest.importorskip("onnxruntime", reason="the ONNX extra is not installed: pip install -e '.[onnx]'")

from conftest import TINY_PRESETS, load, make_image  # noqa: E402
from runtimes.llamacpp.convert import convert_to_gguf  # noqa: E402
from runtimes.llamacpp.eval_callback import DecodeCallbackError  # noqa: E402
from runtimes.llamacpp.runner import LlamaCppVLM  # noqa: E402
from runtimes.llamacpp.scr_hooks import MicroBatchError  # noqa: E402
from scr_export.diagnostic import attention_maps  # noqa: E402
from scr_export.reference import generate  # noqa: E402

GGUF_FAMILIES = ["llava", "internvl", "qwen2_vl", "chameleon"]
_CONVERTED: dict = {}


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory):
    def get(family: str, quant: str):
        key = (family, quant)
        if key not in _CONVERTED:
            out = tmp_path_factory.mktemp("gguf") / f"{family}-{quant}"
            _CONVERTED[key] = convert_to_gguf(TINY_PRESETS[family], out, quant=quant, progress=lambda m: None)
        return _CONVERTED[key]

    return get


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_f32_gguf_with_scr_matches_the_reference(family, gguf_dir):
    out, reports = gguf_dir(family, "f32")
    engine, flt = reports["dequantized"], reports["float"]
    assert engine, engine.table()
    assert all(c.max_rel <= 1e-4 for c in engine.comparisons)
    assert engine.plan_identical and engine.greedy_identical and flt.plan_identical
    if family == "qwen2_vl":
        # llama.cpp 0.3.36 runs Qwen2-VL's RMS norms with eps = 0 (upstream bug): the float model differs by more
        # than the f32 gate, and the report says so instead of hiding it
        assert not flt and all("max rel. error" in f for f in flt.failures)
        manifest = json.loads((out / "manifest.json").read_text())
        assert "epsilon 0" in manifest["gguf"]["known_deviations"][0]
    else:
        assert flt, flt.table()
        assert all(c.max_rel <= 1e-4 for c in flt.comparisons)
    if family == "chameleon":  # image-token logits masked on every row, as Chameleon's head does
        on = LlamaCppVLM(out).generate(LlamaCppVLM(out).encode([[make_image()]], ["Hi"]), max_new_tokens=1,
                                        keep_prefill_logits=True)
        assert (on.prefill_logits[0][:, 4:8196] < -1e30).all()
    vlm = load(TINY_PRESETS[family])
    if family == "qwen2_vl":
        from runtimes.llamacpp.quirks import apply_quirks
        from runtimes.llamacpp.quantize import dequantized_model

        vlm = dequantized_model(vlm, out / "model-f32.gguf", False)  # a copy, so the shared preset stays intact
        apply_quirks(vlm, "qwen2vl")
    runner = LlamaCppVLM(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert ("mmproj" in manifest["images"]) == (family == "qwen2_vl")  # llama.cpp's own projector where supported
    inputs = runner.encode([[make_image(168, 140, seed=3)]], ["Where is the red block?"])
    cfg = runner.config
    got = runner.attention_maps(inputs, runner.embed(inputs), cfg)
    import contextlib

    from scr_export.parity import image_features_override

    same_images = (image_features_override(vlm, runner.image_features(inputs)) if runner.mtmd is not None
                   else contextlib.nullcontext())
    with same_images:
        want = attention_maps(vlm, inputs.tensors, inputs.layouts, cfg)
    np.testing.assert_allclose(got[0][0], want[0][0], rtol=1e-4, atol=1e-7)  # the callback reads the same map
    on = runner.generate(inputs, max_new_tokens=1, keep_prefill_logits=True)
    off = runner.generate(inputs, scr=False, max_new_tokens=1, keep_prefill_logits=True)
    assert not np.allclose(on.prefill_logits, off.prefill_logits), "the SCR hook must change the logits"


def test_identity_and_observe_only_hooks_are_bit_identical_to_no_hook(gguf_dir):
    out, _ = gguf_dir("llava", "f32")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    embeds = runner.embed(inputs)[0]
    llama, cb = runner.llama, runner.llama.callback

    def prefill():
        llama.reset()
        cb.active = True
        try:
            return llama.decode_embeddings(embeds)
        finally:
            cb.active = False

    cb.handlers.clear()
    plain = prefill()
    seen = []
    cb.handlers.update({f"l_out-{i}": (lambda n, rows: seen.append(n)) for i in range(4)})
    observed = prefill()
    assert len(seen) >= 3 and np.array_equal(observed, plain)
    cb.handlers.clear()
    from runtimes.llamacpp.scr_hooks import install_redistribution
    from scr_export.reference import plan_for_inputs

    vlm = load("tiny-llava")
    cfg = runner.config.replace(lam=1.0)
    plan = plan_for_inputs(vlm, inputs, cfg)
    assert len(plan.images[0].sources) == cfg.k
    install_redistribution(cb, cfg, plan.donor[0], plan.scale[0], plan.weight[0])
    ident = prefill()
    cb.handlers.clear()
    assert np.array_equal(ident, plain)


@pytest.mark.parametrize("family, quant", [("llava", "q8_0"), ("llava", "q4_0"), ("qwen2_vl", "q8_0")])
def test_quantized_gguf_passes_its_gates_against_the_dequantized_reference(family, quant, gguf_dir):
    out, reports = gguf_dir(family, quant)
    deq, flt = reports["dequantized"], reports["float"]
    assert deq.precision == {"q8_0": "int8", "q4_0": "4bit"}[quant]
    assert deq, deq.table()
    assert deq.scr_effect_cosine >= (0.95 if quant == "q8_0" else 0.9)
    assert deq.plan_jaccard >= 0.9
    # with the reference's plan forced, the effect isolates the engine's error; it equals the end-to-end one when
    # the plans agree and is what the end-to-end effect would be without plan flips otherwise
    if deq.plan_identical:
        assert deq.scr_effect_cosine_same_plan == deq.scr_effect_cosine
    assert deq.scr_effect_cosine_same_plan >= (0.95 if quant == "q8_0" else 0.9)
    # the float comparison is reported, and is further off than the dequantized one (weights quantized too)
    assert flt.comparisons[0].max_abs >= deq.comparisons[0].max_abs > 1e-5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gguf"]["quant"] == quant and quant.upper() in manifest["gguf"]["tensor_types"]


def test_truncate_forgets_the_last_position_so_it_can_be_decoded_again(gguf_dir):
    out, _ = gguf_dir("llava", "f32")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    llama = runner.llama
    llama.reset()
    llama.decode_embeddings(runner.embed(inputs)[0], want_logits=False)
    n = llama.n_past
    first = llama.decode_token(5).copy()
    other = llama.decode_token(7).copy()
    llama.truncate(n)
    assert llama.n_past == n
    again = llama.decode_token(5)
    assert np.array_equal(again, first) and not np.array_equal(other, first)
    with pytest.raises(ValueError, match="outside"):
        llama.truncate(n + 5)


def test_a_failing_hook_raises_after_the_decode_instead_of_wrong_logits(gguf_dir):
    out, _ = gguf_dir("llava", "f32")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    embeds = runner.embed(inputs)[0]
    cb = runner.llama.callback

    def broken(name, rows):
        raise ValueError("boom")

    cb.handlers["l_out-1"] = broken
    runner.llama.reset()
    cb.active = True
    try:
        with pytest.raises(DecodeCallbackError, match="boom"):
            runner.llama.decode_embeddings(embeds)
    finally:
        cb.active = False
        cb.handlers.clear()


def test_an_image_split_across_micro_batches_is_a_clear_error(gguf_dir):
    out, _ = gguf_dir("llava", "f32")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    plan = runner.generate(inputs, max_new_tokens=1).plan
    from runtimes.llamacpp.scr_hooks import install_redistribution

    cb = runner.llama.callback
    embeds = runner.embed(inputs)[0]
    install_redistribution(cb, runner.config, plan.donor[0], plan.scale[0], plan.weight[0])
    runner.llama.reset()
    cb.active = True
    try:
        with pytest.raises(DecodeCallbackError) as info:  # half the prompt: the hook sees fewer rows than planned
            runner.llama.decode_embeddings(embeds[: embeds.shape[0] // 2])
    finally:
        cb.active = False
        cb.handlers.clear()
    assert isinstance(info.value.__cause__, MicroBatchError)
    assert "one micro-batch" in str(info.value.__cause__)
