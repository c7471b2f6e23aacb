"""Per family (tiny presets): spans and grids against the family's own processing, generation, λ=1, KV/no-KV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_PRESETS, load, make_image
from scr_export.families import FAMILIES
from scr_export.processing import encode
from scr_export.reference import generate


def test_every_registered_family_has_a_tested_preset():
    assert set(FAMILIES) == set(TINY_PRESETS), "a registered family has no tiny preset in the test matrix"


def test_spans_and_grids_match_the_family(vlm, family_name, image):
    inputs = encode(vlm, [[image]], ["What is in the picture?"])
    (span,) = inputs.layouts[0]
    ids = inputs.input_ids[0].numpy()
    image_positions = np.flatnonzero(ids == vlm.image_token_id)
    assert image_positions.tolist() == list(range(span.start, span.end))
    assert ids[span.end:].size > 0  # text follows the image
    if family_name == "llava":
        # 64 px / patch 8, CLS dropped: the vision tower's patch count is the grid
        vc = vlm.config.vision_config
        side = vc.image_size // vc.patch_size
        assert [(g.rows, g.cols) for g in span.grids] == [(side, side)]
        feats = vlm.model.get_image_features(pixel_values=inputs.tensors["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        assert sum(f.shape[0] for f in feats) == span.size
        _compare_with_family_processor(vlm, image, inputs, "LlavaProcessor",
                                       dict(patch_size=vc.patch_size, vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1))
    elif family_name == "qwen2_vl":
        thw = inputs.tensors["image_grid_thw"][0].tolist()
        assert [(g.rows, g.cols) for g in span.grids] == [(thw[1] // 2, thw[2] // 2)]
        # the model's own M-RoPE ids give every image token its (row, col): they must agree with our raster
        pos, _ = vlm.rope_index(inputs.tensors)
        h = pos[1, 0, span.start:span.end].numpy()
        w = pos[2, 0, span.start:span.end].numpy()
        g = span.grids[0]
        rows, cols = np.divmod(np.arange(g.size), g.cols)
        assert np.array_equal(h - h.min(), rows) and np.array_equal(w - w.min(), cols)
    elif family_name == "internvl":
        tiles = int(inputs.tensors["num_patches"][0])
        assert tiles == inputs.tensors["pixel_values"].shape[0] and tiles > 1  # tiles + thumbnail
        assert [(g.rows, g.cols) for g in span.grids] == [(6, 6)] * tiles
        feats = vlm.model.get_image_features(pixel_values=inputs.tensors["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        assert feats.shape[0] == tiles and feats.shape[1] == 36  # pixel shuffle: 12×12 patches -> 6×6 tokens
    elif family_name == "chameleon":
        tokens = vlm.model.model.get_image_tokens(inputs.tensors["pixel_values"])
        assert tokens.shape[-1] == span.size == 64
        assert [(g.rows, g.cols) for g in span.grids] == [(8, 8)]
        _compare_with_family_processor(vlm, image, inputs, "ChameleonProcessor", dict(image_seq_length=64))


def _compare_with_family_processor(vlm, image, inputs, cls_name, kwargs):
    """Where transformers' processor class can be built here (no torchvision needed), its ids must equal ours."""
    import transformers

    proc = getattr(transformers, cls_name)(image_processor=vlm.image_processor, tokenizer=vlm.tokenizer, **kwargs)
    prompt = vlm.format_prompt("What is in the picture?", 1)
    if cls_name == "ChameleonProcessor":
        prompt = prompt[: -len(vlm.tokenizer.sep_token)]  # the processor appends it itself
    theirs = proc(images=[image], text=[prompt], return_tensors="pt", add_special_tokens=False)
    assert theirs["input_ids"].tolist() == inputs.input_ids.tolist()
    assert torch.equal(theirs["pixel_values"], inputs.tensors["pixel_values"])


def test_generate_runs_and_scr_changes_logits(vlm, image):
    inputs = encode(vlm, [[image]], ["Describe the image."])
    cfg = vlm.scr_config()
    on = generate(vlm, inputs, cfg, max_new_tokens=6, stop_at_eos=False)
    off = generate(vlm, inputs, cfg, scr=False, max_new_tokens=6, stop_at_eos=False)
    assert on.tokens.shape == (1, 6)
    assert len(on.plan.images[0].sources) == cfg.k
    assert not np.array_equal(on.logits[0], off.logits[0]), "SCR must change the logits"


def test_lambda_one_is_bit_identical_to_the_plain_model(vlm, image):
    inputs = encode(vlm, [[image]], ["Describe the image."])
    cfg = vlm.scr_config(lam=1.0)
    ident = generate(vlm, inputs, cfg, max_new_tokens=4, stop_at_eos=False, keep_prefill_logits=True)
    plain = generate(vlm, inputs, cfg, scr=False, max_new_tokens=4, stop_at_eos=False, keep_prefill_logits=True)
    assert ident.plan.images[0].sources.size == cfg.k  # a real plan, with λ = 1
    assert np.array_equal(ident.prefill_logits, plain.prefill_logits)
    assert all(np.array_equal(a, b) for a, b in zip(ident.logits, plain.logits))
    # and the plain model is transformers' own forward, untouched by us
    with torch.no_grad():
        direct = vlm.model(**vlm.forward_inputs(inputs.tensors)).logits.numpy()
    assert np.array_equal(plain.prefill_logits, direct)


def test_kv_cache_and_no_cache_agree(vlm, image):
    inputs = encode(vlm, [[image]], ["Describe the image."])
    cfg = vlm.scr_config()
    kv = generate(vlm, inputs, cfg, max_new_tokens=8, stop_at_eos=False)
    full = generate(vlm, inputs, cfg, max_new_tokens=8, use_cache=False, stop_at_eos=False, plan=kv.plan)
    assert np.array_equal(kv.tokens, full.tokens)
    for a, b in zip(kv.logits, full.logits):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_single_rows(vlm):
    a, b = make_image(seed=1), make_image(200, 160, seed=2)
    prompts = ["Describe the image in detail please.", "Why?"]
    batch = encode(vlm, [[a], [b]], prompts)
    cfg = vlm.scr_config()
    res = generate(vlm, batch, cfg, max_new_tokens=4, stop_at_eos=False)
    for row, (im, prompt) in enumerate(zip([a, b], prompts)):
        single = encode(vlm, [[im]], [prompt])
        one = generate(vlm, single, cfg, max_new_tokens=4, stop_at_eos=False)
        shift = batch.shape[1] - single.shape[1]
        assert [s + shift for s in one.plan.images[0].sources] == res.plan.sources(row)[0].tolist()
        np.testing.assert_allclose(res.logits[0][row], one.logits[0][0], atol=2e-4, rtol=1e-3)
        assert res.tokens[row].tolist() == one.tokens[0].tolist()


def test_two_images_in_one_prompt(vlm):
    a, b = make_image(seed=3), make_image(seed=4)
    inputs = encode(vlm, [[a, b]], ["Compare the two pictures."])
    assert len(inputs.layouts[0]) == 2
    res = generate(vlm, inputs, vlm.scr_config(), max_new_tokens=2, stop_at_eos=False)
    first, second = res.plan.images
    assert first.span.end <= second.span.start
    assert all(first.span.start <= s < first.span.end for s in first.sources)
    assert all(second.span.start <= s < second.span.end for s in second.sources)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_reference_runs_and_keeps_the_plan_close(dtype, image):
    from scr_export.loading import load_vlm

    half = load_vlm("tiny-llava", dtype=dtype)
    full = load("tiny-llava")
    cfg = full.scr_config()
    a = generate(half, encode(half, [[image]], ["Describe."]), cfg, max_new_tokens=3, stop_at_eos=False)
    b = generate(full, encode(full, [[image]], ["Describe."]), cfg, max_new_tokens=3, stop_at_eos=False)
    assert half.model.dtype == getattr(torch, dtype)
    assert np.isfinite(a.logits[0]).all()
    src_a, src_b = set(a.plan.sources(0)[0].tolist()), set(b.plan.sources(0)[0].tolist())
    assert len(src_a & src_b) / len(src_a | src_b) >= 0.6  # same model, lower precision: mostly the same sources
    cos = np.dot(a.logits[0][0], b.logits[0][0]) / np.linalg.norm(a.logits[0][0]) / np.linalg.norm(b.logits[0][0])
    assert cos > 0.99
