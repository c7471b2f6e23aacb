"""From images and prompt strings to model inputs plus the image layout (spans and grids)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from .errors import InputError
from .families import VLMFamily
from .layout import ImageSpan


@dataclasses.dataclass
class VLMInputs:
    """Tokenised, padded inputs of a batch, with where each image's tokens are."""

    tensors: dict[str, Any]                # input_ids, attention_mask, pixel_values, family extras (torch or numpy)
    layouts: list[list[ImageSpan]]         # per batch row
    texts: list[str]                       # the expanded prompt text per row
    images: list[list[Any]] | None = None  # the PIL images per row (runtimes with their own image path use them)

    @property
    def input_ids(self):
        return self.tensors["input_ids"]

    @property
    def attention_mask(self):
        return self.tensors["attention_mask"]

    def array(self, name: str):
        """Tensor ``name`` as a numpy array, whether this batch was encoded with torch (``encode``) or without
        (``scr_export.hostproc``): what the runners read."""
        import numpy as np

        value = self.tensors[name]
        return value.cpu().numpy() if hasattr(value, "cpu") else np.asarray(value)

    def to(self, device, dtype=None) -> "VLMInputs":
        """The same inputs as torch tensors on ``device``; numpy arrays (a torch-free encode) become tensors, their
        floating point ones of ``dtype`` when given (torch tensors keep theirs)."""
        import numpy as np
        import torch

        def move(v):
            if isinstance(v, np.ndarray):
                t = torch.from_numpy(np.ascontiguousarray(v))
                return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
            return v.to(device) if hasattr(v, "to") else v

        moved = {k: move(v) for k, v in self.tensors.items()}
        return VLMInputs(tensors=moved, layouts=self.layouts, texts=self.texts, images=self.images)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


def load_image(path: str | Path):
    """Open an image file as RGB, with a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {path} does not exist", "pass the path of a PNG/JPEG file")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"image {path} cannot be read ({exc})", "pass a valid PNG/JPEG image file") from None


def encode(family: VLMFamily, images: Sequence[Sequence[Any]], prompts: Sequence[str]) -> VLMInputs:
    """Encode a batch: ``images[b]`` are the PIL images of prompt ``prompts[b]`` (left padding)."""
    import torch

    from .hostproc.encode import flat_images

    flat = flat_images(images, prompts)
    try:
        image_inputs = family.process_images(flat)
    except InputError:
        raise
    except Exception as exc:  # the image processor's own complaint, made actionable
        raise InputError(f"the {family.display_name} image processor rejected the image ({exc})",
                         "pass an RGB image the model can take (PNG/JPEG, a sensible size)") from None
    texts, idx = [], 0
    for row, prompt in zip(images, prompts):
        text = family.format_prompt(prompt, len(row))
        text, idx = family.expand_placeholders(text, image_inputs, idx)
        texts.append(text)
    tok = family.tokenizer
    tok.padding_side = "left"
    # special tokens as the family's processor adds them (BOS for Llama-tokenizer checkpoints: LLaVA-1.5, Chameleon)
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True)
    tensors: dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    dtype = family.model.dtype
    tensors.update({k: (v.to(dtype) if v.is_floating_point() else v)
                    for k, v in image_inputs.items() if isinstance(v, torch.Tensor)})
    extras = {k: v for k, v in image_inputs.items()}
    from .memory_guard import check as check_memory

    check_memory(family, {"input_ids": tensors["input_ids"].numpy(),
                          **({"image_grid_thw": extras["image_grid_thw"].numpy()} if "image_grid_thw" in extras else {})})
    layouts = family.image_layout(tensors["input_ids"].numpy(), extras)
    return VLMInputs(tensors=tensors, layouts=layouts, texts=texts, images=[list(row) for row in images])
