"""The diagnostic map against transformers' own output_attentions, computed independently."""

from __future__ import annotations

import numpy as np
import torch

from calibration.credit_entropy import credit_entropy, image_token_norms
from scr_export.diagnostic import attention_maps
from scr_export.processing import encode


def test_attention_map_matches_output_attentions(vlm, image):
    inputs = encode(vlm, [[image]], ["Which object is red?"])
    cfg = vlm.scr_config()
    maps = attention_maps(vlm, inputs.to("cpu").tensors, inputs.layouts, cfg)
    with torch.no_grad():
        out = vlm.model(**vlm.forward_inputs(inputs.tensors), output_attentions=True, use_cache=False)
    (span,) = inputs.layouts[0]
    ids = inputs.input_ids[0].numpy()
    queries = [t for t in range(span.end, len(ids)) if ids[t] != vlm.image_token_id]
    stack = torch.stack([out.attentions[l][0] for l in cfg.diag_layer_indices()]).double()  # [L, H, T, T]
    want = stack[:, :, queries][:, :, :, span.start:span.end].mean(dim=(0, 1, 2)).numpy()
    np.testing.assert_allclose(maps[0][0], want, rtol=1e-6, atol=1e-9)
    assert maps[0][0].shape == (span.size,)


def test_image_without_text_after_it_is_skipped(vlm, image):
    inputs = encode(vlm, [[image]], ["x"])
    (span,) = inputs.layouts[0]
    trimmed = {k: v for k, v in inputs.tensors.items()}
    trimmed["input_ids"] = inputs.input_ids[:, : span.end]
    trimmed["attention_mask"] = inputs.attention_mask[:, : span.end]
    maps = attention_maps(vlm, trimmed, inputs.layouts, vlm.scr_config())
    assert maps == [[None]]


def test_credit_entropy():
    assert abs(credit_entropy(np.ones(576)) - np.log(576)) < 1e-12
    assert credit_entropy([5.0, 0, 0]) == 0.0
    peaked = np.r_[100.0, np.ones(575)]
    assert credit_entropy(peaked) < np.log(576)


def test_image_token_norms_are_the_layer_outputs_of_output_hidden_states(vlm, image):
    """‖h‖ at the output of decoder layer L (before any edit) is transformers' hidden_states[L + 1]."""
    inputs = encode(vlm, [[image]], ["Which object is red?"])
    (span,) = inputs.layouts[0]
    with torch.no_grad():
        out = vlm.model(**vlm.forward_inputs(inputs.tensors), output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states  # [embeddings, layer 0 output, layer 1 output, ...]
    assert len(hidden) == vlm.num_layers + 1
    layers = (0, 1)
    got = {l: image_token_norms(vlm, inputs.tensors, inputs.layouts, l)[0][0] for l in layers}
    for layer in layers:
        want = hidden[layer + 1][0, span.start:span.end].double().norm(dim=-1).numpy()
        assert got[layer].shape == (span.size,)
        np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=1e-6)
    # not the embeddings, and each layer its own output
    assert not np.allclose(got[0], hidden[0][0, span.start:span.end].double().norm(dim=-1).numpy(), rtol=1e-3)
    assert not np.allclose(got[0], got[1], rtol=1e-3)
    # the entropy of those norms, by its definition (natural log, not normalised)
    p = got[0].astype(np.float64) / got[0].astype(np.float64).sum()
    assert abs(credit_entropy(got[0]) + (p * np.log(p)).sum()) < 1e-9
