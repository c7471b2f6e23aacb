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
    maps = attention_maps(vlm, inputs.tensors, inputs.layouts, cfg)
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
    assert credit_entropy(np.ones(576)) == np.float64(np.log(576)).item() or abs(credit_entropy(np.ones(576)) - np.log(576)) < 1e-12
    assert credit_entropy([5.0, 0, 0]) == 0.0
    peaked = np.r_[100.0, np.ones(575)]
    assert credit_entropy(peaked) < np.log(576)


def test_image_token_norms_shape(vlm, image):
    inputs = encode(vlm, [[image]], ["Which object is red?"])
    norms = image_token_norms(vlm, inputs.tensors, inputs.layouts, 0)
    assert norms[0][0].shape == (inputs.layouts[0][0].size,) and (norms[0][0] > 0).all()
    assert 0 < credit_entropy(norms[0][0]) <= np.log(norms[0][0].size) + 1e-9
