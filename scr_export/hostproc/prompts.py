"""Image-token expansion without transformers' processor classes: what each family's processor writes in place of
one image placeholder, from the image processor's outputs and a few numbers the converter can record (patch size,
tokens per tile, merge size). tests/test_hostproc.py holds them equal to the families' own expansion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def llava(image_inputs: dict[str, Any], index: int, *, image_token: str, patch_size: int,
          vision_feature_select_strategy: str, num_additional_image_tokens: int) -> str:
    """``<image>`` × patches of the processed image (+ the CLS token, dropped by the "default" strategy)."""
    h, w = np.asarray(image_inputs["pixel_values"]).shape[-2:]
    n = (h // patch_size) * (w // patch_size) + num_additional_image_tokens
    return image_token * (n - 1 if vision_feature_select_strategy == "default" else n)


def qwen2_vl(image_inputs: dict[str, Any], index: int, *, merge_size: int) -> str:
    t, h, w = (int(v) for v in np.asarray(image_inputs["image_grid_thw"])[index])
    return "<|vision_start|>" + "<|image_pad|>" * (t * h * w // merge_size ** 2) + "<|vision_end|>"


def internvl(image_inputs: dict[str, Any], index: int, *, start: str, context: str, end: str,
             image_seq_length: int) -> str:
    tiles = int(np.asarray(image_inputs["num_patches"])[index])
    return start + context * (image_seq_length * tiles) + end


def chameleon(image_inputs: dict[str, Any], index: int, *, image_token: str, image_seq_length: int) -> str:
    return "<racm3:break>" + image_token * image_seq_length + "<eoss>"


EXPANSIONS = {"llava": llava, "qwen2_vl": qwen2_vl, "internvl": internvl, "chameleon": chameleon}


def expand(text: str, placeholder: str, image_inputs: dict[str, Any], first_image: int, family: str,
           **settings: Any) -> tuple[str, int]:
    """Replace each ``placeholder`` in ``text`` by the family's expansion of the next image; returns the text and
    the index of the next image."""
    pieces: Sequence[str] = text.split(placeholder)
    out, idx = [pieces[0]], first_image
    for piece in pieces[1:]:
        out.append(EXPANSIONS[family](image_inputs, idx, **settings))
        out.append(piece)
        idx += 1
    return "".join(out), idx
