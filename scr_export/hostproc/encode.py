"""``encode`` without torch or transformers: images + prompts -> numpy token ids, mask, pixels and the family's
extras, from plain settings (what a converted directory will record: the prompt template, the placeholder, the
expansion numbers and the image processor's config). tests/test_hostproc.py holds it equal to
``scr_export.processing.encode`` for every family."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .images import process
from .prompts import expand
from .tokenize import HostTokenizer


@dataclasses.dataclass(frozen=True)
class HostSettings:
    family: str                      # llava, qwen2_vl, internvl, chameleon
    prompt_template: str             # with {images} and {prompt}
    placeholder: str                 # one image's placeholder in the template and in user prompts
    expansion: dict[str, Any]        # keyword arguments of the family's hostproc.prompts function
    image_processor: dict[str, Any]  # the preprocessor_config.json
    suffix: str = ""                 # appended to every prompt (Chameleon's separator token)


def format_prompt(prompt: str, num_images: int, template: str, placeholder: str, suffix: str = "") -> str:
    """The family's prompt format, with one placeholder per image unless the prompt places them itself (the
    family adapters use it too)."""
    found = prompt.count(placeholder)
    if found and found != num_images:
        raise InputError(f"the prompt has {found} {placeholder} placeholders but {num_images} images were given",
                         f"write one {placeholder} per image, or none to put the images before the prompt")
    return template.replace("{images}", "" if found else placeholder * num_images).format(prompt=prompt) + suffix


def flat_images(images: Sequence[Sequence[Any]], prompts: Sequence[str]) -> list[Any]:
    """The batch's images in order, after the checks every encode makes (one image list per prompt, at least one
    image, none degenerate)."""
    if len(images) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(images)} image lists", "give one image list per prompt")
    flat = [im for row in images for im in row]
    if not flat:
        raise InputError("no image was given", "SCR edits image tokens: pass at least one image")
    for im in flat:
        if min(im.size) < 2:
            raise InputError(f"an image of {im.size[0]}×{im.size[1]} pixels is too small for the model",
                             "pass an image of at least a few dozen pixels per side")
    return flat


def encode(images: Sequence[Sequence[Any]], prompts: Sequence[str], settings: HostSettings,
           tokenizer: HostTokenizer, text_only: bool = False) -> dict[str, Any]:
    """``images[b]`` are the PIL images of ``prompts[b]``; left padding. Returns input_ids, attention_mask,
    pixel_values, the family's extras (image_grid_thw, num_patches) and the expanded texts. ``text_only``: prompts
    without any image are allowed (no pixel values; SCR has nothing to do) - the server's text-only chats."""
    if text_only and not any(len(row) for row in images):
        if len(images) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(images)} image lists", "give one image list per prompt")
        texts = [format_prompt(p, 0, settings.prompt_template, settings.placeholder, settings.suffix)
                 for p in prompts]
        return {**tokenizer(texts), "texts": texts}
    image_inputs = process(flat_images(images, prompts), settings.image_processor)
    texts, idx = [], 0
    for row, prompt in zip(images, prompts):
        text = format_prompt(prompt, len(row), settings.prompt_template, settings.placeholder, settings.suffix)
        text, idx = expand(text, settings.placeholder, image_inputs, idx, settings.family, **settings.expansion)
        texts.append(text)
    out: dict[str, Any] = {**tokenizer(texts), **image_inputs, "texts": texts}
    out["pixel_values"] = np.ascontiguousarray(out["pixel_values"], np.float32)
    return out
