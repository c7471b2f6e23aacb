"""Per family (tiny presets): spans and grids against the family's own processing, generation, λ=1, KV/no-KV."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_PRESETS, load, make_image
from scr_export.layout import query_mask
from scr_export.errors import ConfigError
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
    theirs = proc(images=[image], text=[prompt], return_tensors="pt")  # the processor's defaults: BOS where it adds one
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
    spans = inputs.layouts[0]
    assert len(spans) == 2
    first, second = spans
    cfg = vlm.scr_config()
    res = generate(vlm, inputs, cfg, max_new_tokens=2, stop_at_eos=False)
    ids, am = inputs.input_ids[0].numpy(), inputs.attention_mask[0].numpy()

    # image 1's queries: the real non-image tokens after it, which leaves out image 2's tokens
    q1 = query_mask(ids, am, spans, first)
    assert np.flatnonzero(q1).tolist() == [t for t in range(first.end, len(ids))
                                           if ids[t] != vlm.image_token_id and am[t] == 1]
    assert not q1[second.start:second.end].any() and q1[second.end:].any()

    # each image's map, recomputed from transformers' own attentions over exactly those queries
    with torch.no_grad():
        out = vlm.model(**vlm.forward_inputs(inputs.tensors), output_attentions=True, use_cache=False)
    att = torch.stack([out.attentions[l][0] for l in cfg.diag_layer_indices()]).double().mean(dim=(0, 1)).numpy()
    for i, span in enumerate(spans):
        queries = np.flatnonzero(query_mask(ids, am, spans, span))
        want = att[queries][:, span.start:span.end].mean(axis=0)
        np.testing.assert_allclose(res.plan.attention[0][i], want, rtol=1e-6, atol=1e-9)
    # counting image 2's tokens as queries of image 1 would give another map: the exclusion matters
    after_first = [t for t in range(first.end, len(ids)) if am[t] == 1]  # image 2's tokens included
    with_second = att[after_first][:, first.start:first.end].mean(axis=0)
    assert not np.allclose(with_second, res.plan.attention[0][0], rtol=1e-4, atol=0)
    # two different pictures, two different maps
    map1, map2 = res.plan.attention[0]
    assert map1.shape != map2.shape or not np.allclose(map1, map2, rtol=1e-4, atol=0)

    # k sources per image (fewer only if the image has fewer candidates), each image ranked on its own map
    for i, (span, img) in enumerate(zip(spans, res.plan.images)):
        assert img.span == span
        candidates = [g.start + r * g.cols + c for g in span.grids
                      for r in range(1, g.rows - 1) for c in range(1, g.cols - 1)]
        assert len(img.sources) == min(cfg.k, len(candidates)) and len(set(img.sources.tolist())) == len(img.sources)
        scores = res.plan.attention[0][i]
        best = sorted(candidates, key=lambda t: (-scores[t - span.start], t))[: cfg.k]
        assert img.sources.tolist() == best
    assert first.end <= second.start


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


@pytest.mark.parametrize("layers, hidden, want", [
    (48, 8192, (0, 20)),   # Chameleon 30B (SCR.md table)
    (32, 4096, (0, 15)),   # Chameleon 7B
    (48, 4096, (0, 15)),   # neither: the 7B default
    (40, 8192, (0, 15)),
])
def test_chameleon_defaults_follow_the_model_size(layers, hidden, want):
    """Defaults come from the config alone (no weights): 30B is recognised by its depth and width."""
    import types

    from transformers import ChameleonConfig

    from scr_export.families.chameleon import ChameleonFamily

    cfg = ChameleonConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=64,
                          num_key_value_heads=8, intermediate_size=64, vocab_size=128)
    fam = ChameleonFamily(types.SimpleNamespace(config=cfg), None, None, {})
    scr = fam.scr_config()
    assert scr.layers == want and scr.diag_layers == (8, 16) and (scr.k, scr.lam) == (32, 1.10)
    # a user's range still wins over the default, and one past the depth is an error, not a silent clamp
    assert fam.scr_config(layers=(2, 5)).layers == (2, 5)
    with pytest.raises(ConfigError, match="ends past the decoder's last layer"):
        fam.scr_config(layers=(0, layers))


def test_the_chameleon_preset_keeps_its_own_small_ranges():
    fam = load(TINY_PRESETS["chameleon"])
    assert fam.scr_config().layers == tuple(fam.config.scr_export["layers"])


def test_prompts_start_with_bos_where_the_family_tokenizer_adds_it(vlm, image):
    """Real LLaVA-1.5 and Chameleon checkpoints carry Llama tokenizers that put <s> first (their processors tokenise
    with special tokens); Qwen2-VL's and InternVL's Qwen2 tokenizers add none. The presets copy that, and both
    encoders (transformers', the torch-free one) follow the tokenizer."""
    inputs = encode(vlm, [[image]], ["Describe."])
    bos = vlm.tokenizer.convert_tokens_to_ids("<s>")
    ids = inputs.input_ids[0].tolist()
    assert (ids[0] == bos) == (vlm.name in ("llava", "chameleon"))
    assert ids.count(bos) == (1 if vlm.name in ("llava", "chameleon") else 0)
