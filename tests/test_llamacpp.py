"""llama.cpp with SCR through the eval callback, against the PyTorch reference (float and dequantized weights)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
import onnxruntime  # noqa: E402,F401  (installed by the README's test command: a failed import fails)

from conftest import TINY_PRESETS, load, make_image  # noqa: E402
from runtimes.llamacpp.eval_callback import DecodeCallbackError  # noqa: E402
from runtimes.llamacpp.quantize import dequantized_model  # noqa: E402
from runtimes.llamacpp.quirks import apply_quirks  # noqa: E402
from runtimes.llamacpp.runner import LlamaCppVLM  # noqa: E402
from runtimes.llamacpp.scr_hooks import AttentionCollector, MicroBatchError, install_redistribution  # noqa: E402
from scr_export.config import SCRConfig  # noqa: E402
from scr_export.diagnostic import attention_maps  # noqa: E402
from scr_export.errors import SCRExportError  # noqa: E402
from scr_export.parity import default_inputs  # noqa: E402
from scr_export.reference import image_features_override  # noqa: E402
from scr_export.reference import generate, plan_for_inputs  # noqa: E402

GGUF_FAMILIES = ["llava", "internvl", "qwen2_vl", "chameleon"]




@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_f32_gguf_with_scr_matches_the_reference(family, gguf_dir):
    out, reports = gguf_dir(family, "f32")
    engine, flt = reports["dequantized"], reports["float"]
    assert engine, engine.table()
    assert all(c.max_rel <= 1e-4 for c in engine.comparisons)
    assert engine.plan_identical and engine.greedy_identical and flt.plan_identical
    if family == "qwen2_vl":
        # llama.cpp 0.3.36 runs Qwen2-VL's RMS norms with eps = 0 (upstream bug): the float model differs by more
        # than the f32 gate, and the report says so instead of hiding it ...
        assert not flt and flt.failures and all("max rel. error" in f for f in flt.failures)
        # ... but only by that much: measured max rel. 1.2e-3..1.4e-3, cosine 0.9999996, norm ratio 1.0005..1.0008,
        # KL 1e-8, top-1 >= 0.99 (libmtmd's image path and eps = 0 together); bounded here with margin
        for c in flt.comparisons:
            assert c.max_rel <= 5e-3 and c.cosine >= 0.9999, c
            assert abs(c.norm_ratio - 1) <= 5e-3 and c.kl <= 1e-6 and c.top1 >= 0.95, c
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
        vlm = dequantized_model(vlm, out / "model-f32.gguf", False)  # a copy, so the shared preset stays intact
        apply_quirks(vlm, "qwen2vl")
    runner = LlamaCppVLM(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert ("mmproj" in manifest["images"]) == (family == "qwen2_vl")  # llama.cpp's own projector where supported
    inputs = runner.encode([[make_image(168, 140, seed=3)]], ["Where is the red block?"])
    cfg = runner.config
    got = runner.attention_maps(inputs, runner.embed(inputs), cfg)
    same_images = (image_features_override(vlm, runner.image_features(inputs)) if runner.mtmd is not None
                   else contextlib.nullcontext())
    with same_images:
        want = attention_maps(vlm, inputs.to("cpu").tensors, inputs.layouts, cfg)
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
    vlm = load("tiny-llava")
    cfg = runner.config.replace(lam=1.0)
    plan = plan_for_inputs(vlm, inputs, cfg)
    assert len(plan.images[0].sources) == cfg.k
    install_redistribution(cb, cfg, plan.donor[0], plan.scale[0], plan.weight[0])
    ident = prefill()
    cb.handlers.clear()
    assert np.array_equal(ident, plain)
    # the write-back path: a handler that writes every row back unchanged gives bit-identical logits, and one that
    # writes back rows changed by a small amount gives other logits (what it returns is what the graph goes on with)
    cb.handlers.update({f"l_out-{i}": (lambda n, rows: rows.copy()) for i in range(2)})
    written = prefill()
    cb.handlers.clear()
    assert np.array_equal(written, plain)
    cb.handlers.update({"l_out-0": (lambda n, rows: rows * np.float32(1.01))})
    changed = prefill()
    cb.handlers.clear()
    assert not np.array_equal(changed, plain) and np.isfinite(changed).all()


@pytest.mark.parametrize("family, quant", [("llava", "q8_0"), ("llava", "q4_0"), ("qwen2_vl", "q8_0")])
def test_quantized_gguf_passes_its_gates_against_the_dequantized_reference(family, quant, gguf_dir):
    out, reports = gguf_dir(family, quant)
    deq, flt = reports["dequantized"], reports["float"]
    assert deq.precision == {"q8_0": "int8", "q4_0": "4bit"}[quant]
    assert deq, deq.table()
    assert deq.scr_effect_cosine >= (0.95 if quant == "q8_0" else 0.9)
    assert deq.plan_jaccard >= 0.9
    # the effect cosines, recomputed here from runs of our own (llama.cpp is deterministic on the CPU): end to end
    # with the engine's own plan, and with the reference's plan forced (the engine's error without plan flips)
    runner = LlamaCppVLM(out)
    images, prompts = default_inputs()
    inputs = runner.encode(images, prompts)
    g = json.loads((out / "manifest.json").read_text())["gguf"]
    ref_model = dequantized_model(load(TINY_PRESETS[family]), out / g["file"], g["qk_permuted"])
    apply_quirks(ref_model, g["architecture"])
    features = runner.image_features(inputs) if runner.mtmd is not None else None

    def same_images():  # the reference fed llama.cpp's own image embeddings, as validate does
        return image_features_override(ref_model, features) if features is not None else contextlib.nullcontext()

    def reference(**kw):
        with same_images():
            return generate(ref_model, inputs, runner.config, max_new_tokens=1, stop_at_eos=False,
                            keep_prefill_logits=True, **kw).prefill_logits

    def candidate(**kw):
        return runner.generate(inputs, max_new_tokens=1, stop_at_eos=False, keep_prefill_logits=True, **kw)

    with same_images():
        ref_plan = plan_for_inputs(ref_model, inputs, runner.config)
    ref_effect = reference(plan=ref_plan) - reference(scr=False)
    own, forced, off = candidate(), candidate(plan=ref_plan), candidate(scr=False)
    identical = all(np.array_equal(getattr(own.plan, f), getattr(ref_plan, f)) for f in ("donor", "scale", "weight"))
    assert identical == deq.plan_identical
    assert _cosine(own.prefill_logits - off.prefill_logits, ref_effect) == pytest.approx(deq.scr_effect_cosine,
                                                                                          abs=1e-6)
    same_plan = _cosine(forced.prefill_logits - off.prefill_logits, ref_effect)
    assert same_plan == pytest.approx(deq.scr_effect_cosine_same_plan, abs=1e-6)
    assert same_plan >= (0.95 if quant == "q8_0" else 0.9)
    if identical:  # the plan is the only input that differs between the two runs
        np.testing.assert_array_equal(forced.prefill_logits, own.prefill_logits)
    # the float comparison is reported, and is further off than the dequantized one (weights quantized too)
    assert flt.comparisons[0].max_abs >= deq.comparisons[0].max_abs > 1e-5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gguf"]["quant"] == quant and quant.upper() in manifest["gguf"]["tensor_types"]


def test_f16_gguf_runs_its_float32_vision_graph_and_passes_the_fp16_gates(gguf_dir):
    """An f16 GGUF directory records precision fp16, but its vision / embedding graphs are float32: the runner must
    feed them float32 pixels (it fed float16 and ONNX Runtime refused the input type)."""
    out, reports = gguf_dir("llava", "f16")
    import onnx

    vision = onnx.load(str(out / "vision_encoder.onnx"), load_external_data=False)
    assert vision.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp16"
    deq = reports["dequantized"]
    assert deq, deq.table()
    assert deq.comparisons[0].cosine >= 0.999 and deq.plan_jaccard >= 0.9
    runner = LlamaCppVLM(out)
    res = runner.generate(runner.encode([[make_image(150, 120, seed=5)]], ["Is there a red block?"]),
                          max_new_tokens=3, stop_at_eos=False)
    assert res.tokens.shape == (1, 3)


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


def test_a_prefill_shorter_than_the_plan_is_a_clear_error(gguf_dir):
    """The redistribution hook refuses rows that do not match the plan. Here: half the prompt decoded against a
    plan of the whole prompt (a real micro-batch split is in the next test)."""
    out, _ = gguf_dir("llava", "f32")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    plan = runner.generate(inputs, max_new_tokens=1).plan
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


def test_an_image_split_across_micro_batches_is_a_clear_error(gguf_dir, monkeypatch):
    """A real split: a context whose micro-batch (n_ubatch) is shorter than the prompt, so llama.cpp decodes the
    prefill in pieces and each hook sees only some rows. LlamaContext never makes such a context (n_ubatch = n_ctx);
    here its n_ubatch is lowered on the way into llama_init_from_model."""
    import llama_cpp

    out, _ = gguf_dir("llava", "f32")
    init = llama_cpp.llama_init_from_model

    def small_micro_batches(model, params):
        params.n_ubatch = 16
        return init(model, params)

    monkeypatch.setattr(llama_cpp, "llama_init_from_model", small_micro_batches)
    runner = LlamaCppVLM(out)
    monkeypatch.undo()
    inputs = runner.encode([[make_image()]], ["Describe."])
    assert inputs.shape[1] > 16
    # the diagnostic pass: kq_soft_max arrives as 16 tokens' rows per head
    with pytest.raises(DecodeCallbackError) as info:
        runner.generate(inputs, max_new_tokens=1)
    assert isinstance(info.value.__cause__, MicroBatchError)
    assert "expected" in str(info.value.__cause__) and "one micro-batch" in str(info.value.__cause__)
    # the redistribution pass, with a plan from a context that decodes the prompt whole
    plan = LlamaCppVLM(out).generate(inputs, max_new_tokens=1).plan
    assert not plan.is_identity
    with pytest.raises(DecodeCallbackError) as info:
        runner.generate(inputs, plan=plan, max_new_tokens=1)
    assert isinstance(info.value.__cause__, MicroBatchError)
    assert f"holds 16 rows but the plan covers {inputs.shape[1]} positions" in str(info.value.__cause__)
    # without SCR the same context decodes in pieces and matches a whole-prompt decode
    whole = LlamaCppVLM(out).generate(inputs, scr=False, max_new_tokens=1, keep_prefill_logits=True)
    split = runner.generate(inputs, scr=False, max_new_tokens=1, keep_prefill_logits=True)
    np.testing.assert_allclose(split.prefill_logits, whole.prefill_logits, rtol=1e-4, atol=1e-5)


# -- the host-side hooks, fed rows the way the eval callback hands them over ----------------------------------------

class _Callback:
    def __init__(self):
        self.handlers = {}


def test_attention_collector_averages_heads_and_layers_over_ggml_rows():
    n_head, n_tokens, n_kv = 2, 3, 8  # ggml pads the key axis
    cb = _Callback()
    col = AttentionCollector(cb, SCRConfig(layers=(0, 0), diag_layers=(1, 2)), n_tokens, n_head)
    assert set(cb.handlers) == {"kq_soft_max-1", "kq_soft_max-2"}
    rng = np.random.default_rng(0)
    probs = {layer: rng.random((n_head, n_tokens, n_kv)).astype(np.float32) for layer in (1, 2)}
    for layer, p in probs.items():  # ggml layout [n_head][n_tokens][n_kv]: rows = n_head * n_tokens
        assert cb.handlers[f"kq_soft_max-{layer}"](f"kq_soft_max-{layer}", p.reshape(n_head * n_tokens, n_kv)) is None
    want = np.zeros((2, n_tokens, n_tokens))
    for i, layer in enumerate((1, 2)):
        for q in range(n_tokens):
            for k in range(n_tokens):
                want[i, q, k] = sum(float(probs[layer][h, q, k]) for h in range(n_head)) / n_head
    np.testing.assert_allclose(col.result(), want, rtol=1e-12)


def test_a_diagnostic_layer_whose_hook_never_fires_is_an_error():
    """A renamed tensor in a new llama.cpp must not make the map one of fewer layers."""
    cb = _Callback()
    col = AttentionCollector(cb, SCRConfig(layers=(0, 0), diag_layers=(1, 2)), n_tokens=3, n_head=2)
    cb.handlers["kq_soft_max-1"]("kq_soft_max-1", np.ones((6, 4), np.float32))
    with pytest.raises(SCRExportError, match=r"no attention probabilities for layers \[2\]"):
        col.result()


def test_attention_collector_refuses_a_micro_batch_of_the_prompt():
    cb = _Callback()
    col = AttentionCollector(cb, SCRConfig(layers=(0, 0), diag_layers=(0, 0)), n_tokens=10, n_head=4)
    with pytest.raises(MicroBatchError, match=r"kq_soft_max-0 holds 16 rows, expected 4 heads x 10 tokens") as info:
        cb.handlers["kq_soft_max-0"]("kq_soft_max-0", np.zeros((4 * 4, 16), np.float32))  # 4 of the 10 tokens
    assert "one micro-batch" in info.value.fix
    with pytest.raises(SCRExportError, match="saw no attention probabilities"):
        col.result()  # nothing was accumulated from the refused rows


def test_redistribution_handler_edits_the_planned_rows_and_refuses_a_split():
    donor = np.array([0, 0, 2, 2, 4], np.int64)   # 1 receives from 0, 3 from 2
    scale = np.array([0.5, 1, 0.8, 1, 1], np.float32)
    weight = np.array([0, 0.25, 0, 0.5, 0], np.float32)
    cb = _Callback()
    install_redistribution(cb, SCRConfig(layers=(1, 2)), donor, scale, weight)
    assert set(cb.handlers) == {"l_out-1", "l_out-2"}
    rows = np.arange(15, dtype=np.float32).reshape(5, 3) + 1
    before = rows.copy()
    out = cb.handlers["l_out-1"]("l_out-1", rows)
    want = [[float(scale[t]) * float(before[t, d]) + float(weight[t]) * float(before[donor[t], d]) for d in range(3)]
            for t in range(5)]
    np.testing.assert_allclose(out, want, rtol=1e-6)
    np.testing.assert_array_equal(rows, before)  # read-only on its input; both reads see the pre-edit rows
    with pytest.raises(MicroBatchError, match="l_out-2 holds 2 rows but the plan covers 5 positions"):
        cb.handlers["l_out-2"]("l_out-2", rows[:2])
    ident = _Callback()
    install_redistribution(ident, SCRConfig(layers=(0, 0)), np.arange(5), np.ones(5, np.float32),
                           np.zeros(5, np.float32))
    assert ident.handlers["l_out-0"]("l_out-0", rows) is None  # identity: nothing is written back


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_prompt_beyond_the_llama_context_is_refused(gguf_dir):
    """The context guard of the llama.cpp runner: prompt (image tokens included) + new tokens beyond n_ctx is
    refused with the numbers and a fix, before the diagnostic pass."""
    out, _ = gguf_dir("llava", "q8_0")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    n_ctx = runner.n_ctx
    with pytest.raises(SCRExportError, match=rf"exceed the llama.cpp context \(n_ctx\) \({n_ctx}\)") as exc:
        runner.generate(inputs, max_new_tokens=n_ctx)
    assert "fewer new tokens" in exc.value.fix
    assert runner.generate(inputs, max_new_tokens=2, stop_at_eos=False).tokens.shape == (1, 2)


def test_a_hook_on_a_tensor_that_never_appears_fails_the_run(gguf_dir):
    """A renamed tensor in a new llama.cpp must not make SCR a silent no-op: every hook of a pass has to fire, and
    what the callback recorded is cleared after each pass."""
    out, _ = gguf_dir("llava", "q8_0")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    embeds = runner.embed(inputs)
    runner.llama.callback.handlers["l_out-999"] = lambda name, rows: None
    with pytest.raises(SCRExportError, match=r"hooks on l_out-999 never fired"):
        runner._hooked_prefill(inputs, embeds, want_logits=False)
    assert runner.llama.callback.handlers == {} and runner.llama.callback.seen == []
    res = runner.generate(inputs, max_new_tokens=2, stop_at_eos=False)  # the real hooks fire: no error
    assert not res.plan.is_identity and runner.llama.callback.seen == []


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_cut_diagnostic_pass_gives_the_full_passs_maps_and_leaks_nothing_into_the_scr_prefill(family, gguf_dir):
    """The diagnostic pass stops after the last diagnostic layer's attention: the maps are bit-equal to a whole
    prefill's, the SCR prefill and decode that follow are bit-equal too, and the graph really stopped (a hook on the
    last layer never fires)."""
    out, _ = gguf_dir(family, "q8_0")
    runner = LlamaCppVLM(out)
    inputs = runner.encode([[make_image()]], ["Describe."])
    embeds = runner.embed(inputs)
    cfg = runner.config.clamped(runner.family.num_layers)

    def run():
        maps = runner.attention_maps(inputs, embeds, cfg)[0]
        res = runner.generate(inputs, max_new_tokens=3, keep_prefill_logits=True, stop_at_eos=False)
        return maps, res

    runner.cut_diagnostic = False
    full_maps, full = run()
    runner.cut_diagnostic = True
    cut_maps, cut = run()
    for a, b in zip(full_maps, cut_maps):
        assert a is not None and np.array_equal(a, b)  # one credit map per image, float64
    assert np.array_equal(full.prefill_logits, cut.prefill_logits)
    assert all(np.array_equal(a, b) for a, b in zip(full.logits, cut.logits))
    assert np.array_equal(full.tokens, cut.tokens)

    last_diag = max(cfg.diag_layer_indices())
    assert last_diag < runner.family.num_layers - 1  # the presets diagnose early layers: there is a rest to cut
    runner.callback.handlers.clear()
    AttentionCollector(runner.callback, cfg, inputs.shape[1], runner.n_head)
    runner.callback.handlers[f"l_out-{runner.family.num_layers - 1}"] = lambda name, rows: None
    with pytest.raises(SCRExportError, match=rf"l_out-{runner.family.num_layers - 1} never fired"):
        runner._hooked_prefill(inputs, embeds, want_logits=False, stop_after=f"kq_soft_max-{last_diag}")


def test_decoding_runs_in_a_context_without_callback_and_matches_decoding_in_the_hooked_one(gguf_dir):
    """The prompt's KV cache (SCR edits included) moves from the hooked context to a plain one: the decode steps
    there give the logits the hooked context gives, bit for bit, without ggml asking Python about every node."""
    out, _ = gguf_dir("qwen2_vl", "q8_0")  # M-RoPE positions travel with the cells
    runner = LlamaCppVLM(out)
    assert runner.decoder.callback is None and runner.llama.callback is runner.callback
    inputs = runner.encode([[make_image()]], ["Describe."])
    res = runner.generate(inputs, max_new_tokens=4, stop_at_eos=False)
    # the same request decoded where it was prefilled (the path before the plain context)
    embeds = runner.embed(inputs)
    install_redistribution(runner.callback, runner.config.clamped(runner.family.num_layers), res.plan.donor[0],
                           res.plan.scale[0], res.plan.weight[0])
    logits = runner._hooked_prefill(inputs, embeds, want_logits=True)
    hooked = [logits[-1]]
    first = runner._row(inputs, 0)[2]
    for step, tok in enumerate(res.tokens[0, :-1].tolist()):
        hooked.append(runner.llama.decode_token(tok, first + step))
    for a, b in zip(res.logits, hooked):
        assert np.array_equal(a[0], b.astype(np.float32))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batch_of_two_with_two_images_in_one_prompt_matches_the_reference(family, gguf_dir):
    """Batch 2, the second prompt with two images: llama.cpp runs one sequence per prompt, and the plan, tokens and
    prefill logits match the PyTorch reference on the GGUF's weights (the same gates as ONNX Runtime's batch test).
    Qwen2-VL takes its images through libmtmd, so the reference is fed libmtmd's features."""
    out, _ = gguf_dir(family, "f32")
    runner = LlamaCppVLM(out)
    # the float model: the reference with llama.cpp's Qwen2-VL quirk (RMS eps 0) turns padded rows into NaN, so
    # Qwen2-VL is held to the float bound of the f32 test (5e-3, the quirk's size) instead of 1e-4
    vlm = load(TINY_PRESETS[family])
    bound = 5e-3 if family == "qwen2_vl" else 1e-4
    images = [[make_image(168, 140, seed=11)], [make_image(224, 112, seed=12), make_image(112, 112, seed=13)]]
    inputs = runner.encode(images, ["A long question about the picture, please answer it?", "Compare them."])
    assert inputs.shape[0] == 2 and len(inputs.layouts[1]) == 2
    mask = inputs.array("attention_mask")
    assert mask[0].sum() != mask[1].sum()  # really padded
    same_images = (image_features_override(vlm, runner.image_features(inputs)) if runner.mtmd is not None
                   else contextlib.nullcontext())
    with same_images:
        ref = generate(vlm, inputs.to("cpu"), runner.config, max_new_tokens=6, stop_at_eos=False,
                       keep_prefill_logits=True)
    got = runner.generate(inputs, max_new_tokens=6, stop_at_eos=False, keep_prefill_logits=True)
    assert len(got.plan.images) == 3 and all(p.skipped is None for p in got.plan.images)
    assert np.array_equal(got.plan.donor, ref.plan.donor)
    assert got.tokens.tolist() == ref.tokens.tolist()
    real = mask.astype(bool)
    ref_prefill = np.asarray(ref.prefill_logits, np.float32)
    diff = np.abs(got.prefill_logits - ref_prefill)[real]
    assert diff.max() / np.abs(ref_prefill[real]).max() <= bound
    # each row equals that prompt run alone: nothing of one sequence reaches the next
    alone = runner.generate(runner.encode(images[1:], ["Compare them."]), max_new_tokens=6, stop_at_eos=False)
    assert alone.tokens.tolist() == got.tokens[1:].tolist()
    assert np.array_equal(alone.logits[-1][0], got.logits[-1][1])
