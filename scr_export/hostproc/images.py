"""Image pre-processing in numpy + PIL, equal to transformers' PIL image processors (the ones transformers picks
without torchvision), for the four families: CLIP (LLaVA-1.5), Qwen2-VL, GotOcr2 (InternVL2) and Chameleon.

Each processor reads the ``preprocessor_config.json`` the converter writes and returns what the exported vision
graph takes (float32 ``pixel_values`` and the family's extras). The operations are transformers' own, in its order:
RGB conversion (alpha and palette transparency composited on white), PIL resize of the uint8 image
(``reducing_gap=None``), centre crop, ``uint8 → float64 × rescale_factor → float32``, then ``(x − mean) / std``
in float32. Any other order differs by up to 2e-7; this one is bit-identical (tests/test_hostproc.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError


def to_rgb(image):
    """transformers' ``convert_to_rgb``: images with an alpha band or palette transparency are composited on white;
    every other mode goes through PIL's own conversion. EXIF orientation is not applied (transformers does not)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image, width: int, height: int, resample: int):
    return image.resize((width, height), resample=resample, reducing_gap=None)


def chw(image) -> np.ndarray:
    return np.asarray(image).transpose(2, 0, 1)


def shortest_edge(image, size: int, resample: int):
    """Resize so the shorter side is ``size`` and the longer keeps the ratio (truncated, as transformers does)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    other = int(size * long / short)
    return resize(image, size, other, resample) if w <= h else resize(image, other, size, resample)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (pixels.shape[1] - height) // 2, (pixels.shape[2] - width) // 2
    if top < 0 or left < 0:
        raise InputError(f"the image is smaller than the {width}×{height} crop after resizing",
                         "pass a larger image")
    return pixels[:, top:top + height, left:left + width]


def rescale_normalize(pixels: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    x = pixels.astype(np.float64) * cfg["rescale_factor"] if cfg.get("do_rescale", True) else pixels.astype(np.float64)
    x = x.astype(np.float32)
    if cfg.get("do_normalize", True):
        mean = np.asarray(cfg["image_mean"], np.float32)[:, None, None]
        std = np.asarray(cfg["image_std"], np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def _rgb(image, cfg):
    return to_rgb(image) if cfg.get("do_convert_rgb", True) else image


def clip(images: Sequence[Any], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """CLIP-style (LLaVA-1.5; Chameleon uses the same steps with its own sizes, filter and normalisation)."""
    out = []
    for image in images:
        image = _rgb(image, cfg)
        if cfg.get("do_resize", True):
            image = shortest_edge(image, int(cfg["size"]["shortest_edge"]), int(cfg["resample"]))
        pixels = chw(image)
        if cfg.get("do_center_crop", True):
            pixels = center_crop(pixels, int(cfg["crop_size"]["height"]), int(cfg["crop_size"]["width"]))
        out.append(rescale_normalize(pixels, cfg))
    return {"pixel_values": np.stack(out)}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's size rule: multiples of ``factor`` (Python rounding), the area within [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"the image's aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200",
                         "crop the image to a less extreme shape")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def qwen2_vl(images: Sequence[Any], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Patches [sum(t·h·w), C·T·P·P] row-ordered by 2×2 merge block, and ``image_grid_thw``."""
    patch, merge, temporal = int(cfg["patch_size"]), int(cfg["merge_size"]), int(cfg["temporal_patch_size"])
    size = cfg.get("size") or {}
    lo = int(cfg.get("min_pixels") or size["shortest_edge"])
    hi = int(cfg.get("max_pixels") or size["longest_edge"])
    rows, grids = [], []
    for image in images:
        image = _rgb(image, cfg)
        h, w = smart_resize(image.height, image.width, patch * merge, lo, hi) if cfg.get("do_resize", True) \
            else (image.height, image.width)
        x = rescale_normalize(chw(resize(image, w, h, int(cfg["resample"]))), cfg)
        gh, gw = h // patch, w // patch
        p = x.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch).transpose(1, 4, 2, 5, 0, 3, 6)
        p = np.broadcast_to(p[:, :, :, :, :, None], p.shape[:5] + (temporal,) + p.shape[5:])
        rows.append(p.reshape(gh * gw, 3 * temporal * patch * patch))
        grids.append([1, gh, gw])
    return {"pixel_values": np.ascontiguousarray(np.concatenate(rows)), "image_grid_thw": np.asarray(grids, np.int64)}


def _tile_grid(height: int, width: int, tile_h: int, tile_w: int, lo: int, hi: int) -> tuple[int, int]:
    """GotOcr2's closest aspect ratio among (columns, rows) with lo ≤ c·r ≤ hi; a tie goes to the larger grid when
    the image has more than half its pixels."""
    grids = sorted(((c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi),
                   key=lambda g: g[0] * g[1])
    best, best_diff, ratio = (1, 1), float("inf"), width / height
    for c, r in grids:
        diff = abs(ratio - c / r)
        if diff < best_diff:
            best_diff, best = diff, (c, r)
        elif diff == best_diff and width * height > 0.5 * tile_h * tile_w * c * r:
            best = (c, r)
    return best


def gotocr2(images: Sequence[Any], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """InternVL2's tiling: the image resized once to (columns × rows) tiles, row-major, plus a thumbnail when there
    is more than one tile; ``num_patches`` = tiles per image."""
    if not cfg.get("crop_to_patches", False):
        raise InputError("this InternVL image processor does not tile (crop_to_patches is off)",
                         "use the transformers pre-processing for this checkpoint")
    th, tw = int(cfg["size"]["height"]), int(cfg["size"]["width"])
    tiles, counts = [], []
    for image in images:
        image = _rgb(image, cfg)
        c, r = _tile_grid(image.height, image.width, th, tw, int(cfg["min_patches"]), int(cfg["max_patches"]))
        big = chw(resize(image, tw * c, th * r, int(cfg["resample"])))
        own = [big[:, (i // c) * th:(i // c + 1) * th, (i % c) * tw:(i % c + 1) * tw] for i in range(c * r)]
        if len(own) != 1:
            own.append(chw(resize(image, tw, th, int(cfg["resample"]))))
        tiles += [rescale_normalize(t, cfg) for t in own]
        counts.append(len(own))
    return {"pixel_values": np.stack(tiles), "num_patches": np.asarray(counts, np.int64)}


PROCESSORS: dict[str, Callable[[Sequence[Any], dict[str, Any]], dict[str, np.ndarray]]] = {
    "CLIPImageProcessor": clip,
    "ChameleonImageProcessor": clip,
    "Qwen2VLImageProcessor": qwen2_vl,
    "GotOcr2ImageProcessor": gotocr2,
}
_UNSUPPORTED = ("do_pad", "do_image_splitting")


def process(images: Sequence[Any], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the processor ``cfg["image_processor_type"]`` names (a ``preprocessor_config.json``)."""
    kind = str(cfg.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
    fn = PROCESSORS.get(kind)
    if fn is None:
        raise InputError(f"no torch-free pre-processing for {kind or 'an unnamed image processor'}",
                         f"supported: {', '.join(sorted(PROCESSORS))}")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise InputError(f"the torch-free {kind} does not implement {key}", "use the transformers pre-processing")
    return fn(images, cfg)
