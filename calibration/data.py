"""Calibration data: where the image + prompt pairs that calibrate a quantized model come from.

Three sources, all checked before any conversion work starts (a bad one is an exit-2 error that names the file and
the line, and leaves no output directory):

- a folder of images (``*.png``, ``*.jpg``, ``*.jpeg``, ``*.bmp``, ``*.webp``), sorted by name, with an optional
  ``prompts.txt`` beside them: one prompt a line, cycled over the images;
- a JSONL file of ``{"image": path, "prompt": text}`` records, image paths relative to the file;
- nothing: a built-in set of synthetic images and prompts, with a loud warning (real calibration needs real data:
  the ranges of a deployed model should come from the images and questions it will see).

Text-only calibration never exercises SCR (it edits image tokens only), so every sample has an image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from scr_export.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_PROMPTS = (
    "What is in this picture? Describe the main object.",
    "Is there a red object in the image? Answer yes or no.",
    "Describe the colours and shapes you see.",
    "How many distinct objects are in the image?",
)
DEFAULT_SAMPLES = 8
SYNTHETIC_WARNING = ("calibrating on the built-in synthetic images: fine for a smoke test, not for a model you "
                     "deploy. Pass --calib-data with real images (and prompts) of your use case.")


class CalibrationDataError(InputError):
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


def _open_image(path: Path, where: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CalibrationDataError(f"{where}: the image {path} does not exist",
                                   "fix the path (JSONL image paths are relative to the JSONL file)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CalibrationDataError(f"{where}: the image {path} cannot be read ({exc})",
                                   "remove or replace the file; calibration images must be PNG/JPEG/BMP/WebP") from None


def _from_folder(folder: Path) -> list[tuple[Path, str]]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationDataError(f"the calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                                   "put the images of your use case there, or pass a JSONL file of "
                                   '{"image": ..., "prompt": ...} records')
    prompts = list(DEFAULT_PROMPTS)
    prompts_file = folder / "prompts.txt"
    if prompts_file.is_file():
        prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise CalibrationDataError(f"{prompts_file} holds no prompts", "write one prompt a line, or delete the file")
    return [(img, prompts[i % len(prompts)]) for i, img in enumerate(images)]


def _from_jsonl(path: Path) -> list[tuple[Path, str]]:
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{where} is not JSON ({exc.msg})",
                                       'write one {"image": "path", "prompt": "text"} object per line') from None
        if not isinstance(rec, dict):
            raise CalibrationDataError(f"{where} is not a JSON object", 'write {"image": "path", "prompt": "text"}')
        missing = [k for k in ("image", "prompt") if not isinstance(rec.get(k), str) or not rec.get(k)]
        if missing:
            raise CalibrationDataError(f"{where} has no {' or '.join(repr(m) for m in missing)} string",
                                       'every line needs {"image": "path", "prompt": "text"}')
        image = Path(rec["image"])
        records.append((image if image.is_absolute() else path.parent / image, rec["prompt"], where))
    if not records:
        raise CalibrationDataError(f"the calibration file {path} holds no records",
                                   'write one {"image": "path", "prompt": "text"} object per line')
    for image, _, where in records:  # all paths checked before any image is decoded
        if not image.is_file():
            raise CalibrationDataError(f"{where}: the image {image} does not exist",
                                       "fix the path (image paths are relative to the JSONL file)")
    return [(image, prompt) for image, prompt, _ in records]


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
    if p.is_dir():
        listed = _from_folder(p)
    elif p.is_file():
        if p.suffix.lower() not in (".jsonl", ".json"):
            raise CalibrationDataError(f"--calib-data {p} is neither a folder nor a .jsonl file",
                                       "pass a folder of images (with an optional prompts.txt) or a JSONL file")
        listed = _from_jsonl(p)
    else:
        raise CalibrationDataError(f"--calib-data {p} does not exist",
                                   "pass a folder of images or a JSONL file of {\"image\", \"prompt\"} records")
    if samples is not None:
        listed = listed[:samples]
    pairs = [CalibrationSample(_open_image(img, str(img)), prompt, str(img)) for img, prompt in listed]
    return CalibrationSet(pairs, str(p), _fingerprint(pairs))


def _fingerprint(pairs: list[CalibrationSample]) -> str:
    h = hashlib.sha256()
    for s in pairs:
        h.update(s.image.tobytes())
        h.update(repr(s.image.size).encode())
        h.update(s.prompt.encode())
    return h.hexdigest()
