"""Host position ids in numpy (scr_export.positions) against the model's own functions, which the PyTorch
reference uses: every family, one image, several images, a left-padded batch of different lengths, and the decode
steps after the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_PRESETS, load, make_image
from scr_export.processing import encode

BATCHES = {
    "one image": ([[make_image()]], ["Describe."]),
    "padded batch": ([[make_image(150, 190, seed=3)], [make_image(260, 90, seed=4)]],
                     ["Is there a red block in this picture?", "Hi."]),
}


@pytest.mark.parametrize("case", sorted(BATCHES))
def test_host_positions_equal_the_models_own(family_name, case):
    fam = load(TINY_PRESETS[family_name])
    images, prompts = BATCHES[case]
    inputs = encode(fam, images, prompts)
    arrays = {k: v.numpy() for k, v in inputs.tensors.items() if isinstance(v, torch.Tensor)}
    prefill, first = fam.host_positions(arrays)
    want = fam.forward_inputs(inputs.tensors)["position_ids"]
    np.testing.assert_array_equal(prefill, want.numpy())
    if fam.uses_mrope:
        assert prefill.shape[0] == 3 and not np.array_equal(prefill[1], prefill[2])  # real 2-D image rows
    mask = inputs.attention_mask
    for step in range(4):
        grown = torch.cat([mask, torch.ones(mask.shape[0], step + 1, dtype=mask.dtype)], 1)
        np.testing.assert_array_equal(first + step, fam.decode_position_ids(inputs.tensors, grown).numpy())


def test_mrope_with_two_images_in_one_prompt():
    fam = load(TINY_PRESETS["qwen2_vl"])
    inputs = encode(fam, [[make_image(), make_image(120, 200, seed=5)]], ["Compare the two pictures."])
    arrays = {k: v.numpy() for k, v in inputs.tensors.items() if isinstance(v, torch.Tensor)}
    prefill, first = fam.host_positions(arrays)
    want, deltas = fam.rope_index(inputs.tensors)
    np.testing.assert_array_equal(prefill, want.numpy())
    assert int(first[0, 0, 0]) == inputs.shape[1] + int(deltas[0, 0])
