"""Calibration data: where the image + prompt pairs that calibrate a quantized model come from.

Three sources, all checked before any conversion work starts (a bad one is an exit-2 error that names the file and
the line, and leaves no output directory):

- a folder of images with an optional ``prompts.txt`` (one prompt a line, cycled over the images), or a JSONL file
  of ``{"image": path, "prompt": text}`` records, image paths relative to the file: read by ``scr_export.datasets``,
  as ``validate --data`` reads them;
- nothing: a built-in set of synthetic images and prompts, with a loud warning (real calibration needs real data:
  the ranges of a deployed model should come from the images and questions it will see).

Text-only calibration never exercises SCR (it edits image tokens only), so every sample has an image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Any

from scr_export.datasets import DataError, list_records, open_image

DEFAULT_PROMPTS = (
    "What is in this picture? Describe the main object.",
    "Is there a red object in the image? Answer yes or no.",
    "Describe the colours and shapes you see.",
    "How many distinct objects are in the image?",
)
DEFAULT_SAMPLES = 8
SYNTHETIC_WARNING = ("calibrating on the built-in synthetic images: fine for a smoke test, not for a model you "
                     "deploy. Pass --calib-data with real images (and prompts) of your use case.")


class CalibrationDataError(DataError):
    """The calibration data cannot be read (exit 2)."""


@dataclasses.dataclass
class CalibrationSample:
    image: Any           # PIL.Image, RGB
    prompt: str
    origin: str          # the file (or "synthetic:N") it came from, for messages


@dataclasses.dataclass
class CalibrationSet:
    samples: list[CalibrationSample]
    source: str          # what the user passed, in words
    fingerprint: str     # sha256 over the images' bytes and the prompts, in order (part of the cache key)
    synthetic: bool = False

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self.samples), "sha256": self.fingerprint,
                "synthetic": self.synthetic}


def synthetic_images(n: int):
    """``n`` deterministic structured images of varied size and content (the built-in set)."""
    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(1000 + i)
        w, h = 224 + 28 * (i % 3), 168 + 28 * ((i // 3) % 3)
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x / w) * 255, (y / h) * 255, (np.sin(x / (7 + i)) * 0.5 + 0.5) * 255], -1)
        for _ in range(2 + i % 3):  # a few coloured blocks: something for attention to collapse onto
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            img[y0:y0 + rng.integers(20, 60), x0:x0 + rng.integers(20, 80)] = rng.integers(0, 256, 3)
        img += rng.normal(0, 8, img.shape)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    return out


def load_calibration_data(path: str | Path | None, samples: int | None = None, *, warn=None) -> CalibrationSet:
    """Read and check a calibration source; ``samples`` caps how many pairs are used (default: all, or 8 synthetic).

    ``warn`` receives the synthetic-data warning (default: ``warnings.warn``).
    """
    if samples is not None and samples < 1:
        raise CalibrationDataError(f"--calib-samples {samples} is not positive", "use at least 1 (32 or more for "
                                   "a model you deploy)")
    if path is None:
        n = samples or DEFAULT_SAMPLES
        (warn or (lambda m: warnings.warn(m, stacklevel=2)))(f"WARNING: {SYNTHETIC_WARNING}")
        imgs = synthetic_images(n)
        pairs = [CalibrationSample(img, DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)], f"synthetic:{i}")
                 for i, img in enumerate(imgs)]
        return CalibrationSet(pairs, f"built-in synthetic set ({n})", _fingerprint(pairs), synthetic=True)
    p = Path(path)
    listed = list_records(p, default_prompts=DEFAULT_PROMPTS, what="--calib-data", error=CalibrationDataError)
    if samples is not None:
        listed = listed[:samples]
    pairs = [CalibrationSample(open_image(r.image, r.where, CalibrationDataError), r.prompt, str(r.image))
             for r in listed]
    return CalibrationSet(pairs, str(p), _fingerprint(pairs))


def _fingerprint(pairs: list[CalibrationSample]) -> str:
    h = hashlib.sha256()
    for s in pairs:
        h.update(s.image.tobytes())
        h.update(repr(s.image.size).encode())
        h.update(s.prompt.encode())
    return h.hexdigest()
