"""Image + prompt data from disk, for calibration (``calibration/data.py``) and dataset validation (``validate
--data``). Every source is checked before any work starts: a bad one is an exit-2 error naming the file and line.

- a folder of images (``*.png``, ``*.jpg``, ``*.jpeg``, ``*.bmp``, ``*.webp``), sorted by name, with an optional
  ``prompts.txt`` beside them: one prompt a line, cycled over the images;
- a JSONL file of ``{"image": path, "prompt": text}`` records;
- a POPE-format JSONL file: ``{"image": path, "question": text, "label": "yes"|"no"}`` (POPE's own files name the
  question ``"text"``; both are read). Image paths are relative to the JSONL file, or to ``image_root``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LABELS = ("yes", "no")


class DataError(InputError):
    """The data cannot be read (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Record:
    image: Path
    prompt: str
    where: str                 # file:line (or the image file) for messages and reports
    label: str | None = None   # POPE's "yes" / "no"


def list_records(path: str | Path, *, default_prompts: tuple[str, ...] = (), what: str = "--data",
                 image_root: str | Path | None = None, error: type[DataError] = DataError) -> list[Record]:
    """The records of a folder or a JSONL file, every image path checked to exist (nothing decoded yet)."""
    p = Path(path)
    if p.is_dir():
        records = _from_folder(p, default_prompts, what, error)
    elif p.is_file():
        if p.suffix.lower() not in (".jsonl", ".json"):
            raise error(f"{what} {p} is neither a folder nor a .jsonl file",
                        "pass a folder of images (with an optional prompts.txt) or a JSONL file")
        records = _from_jsonl(p, Path(image_root) if image_root else p.parent, what, error)
    else:
        raise error(f"{what} {p} does not exist",
                    'pass a folder of images or a JSONL file of {"image", "prompt"} records')
    for r in records:  # all paths checked before any image is decoded
        if not r.image.is_file():
            raise error(f"{r.where}: the image {r.image} does not exist",
                        "fix the path (image paths are relative to the JSONL file)")
    return records


def open_image(path: Path, where: str, error: type[DataError] = DataError):
    """The image as RGB, or an exit-2 error naming where it was listed."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise error(f"{where}: the image {path} does not exist",
                    "fix the path (JSONL image paths are relative to the JSONL file)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise error(f"{where}: the image {path} cannot be read ({exc})",
                    "remove or replace the file; images must be PNG/JPEG/BMP/WebP") from None


def _from_folder(folder: Path, default_prompts: tuple[str, ...], what: str, error) -> list[Record]:
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise error(f"the folder {folder} ({what}) holds no images ({', '.join(IMAGE_SUFFIXES)})",
                    'put the images of your use case there, or pass a JSONL file of {"image": ..., "prompt": ...} '
                    "records")
    prompts = list(default_prompts)
    prompts_file = folder / "prompts.txt"
    if prompts_file.is_file():
        prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise error(f"{prompts_file} holds no prompts", "write one prompt a line, or delete the file")
    if not prompts:
        raise error(f"the folder {folder} has no prompts.txt", "write one prompt a line into prompts.txt beside "
                    "the images")
    return [Record(img, prompts[i % len(prompts)], str(img)) for i, img in enumerate(images)]


def _from_jsonl(path: Path, root: Path, what: str, error) -> list[Record]:
    records = []
    fmt = '{"image": "path", "prompt": "text"} or POPE\'s {"image", "question" (or "text"), "label": "yes"|"no"}'
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where} is not JSON ({exc.msg})", f"write one {fmt} object per line") from None
        if not isinstance(rec, dict):
            raise error(f"{where} is not a JSON object", f"write {fmt}")
        prompt = next((rec[k] for k in ("prompt", "question", "text") if isinstance(rec.get(k), str) and rec[k]),
                      None)
        if not isinstance(rec.get("image"), str) or not rec["image"] or prompt is None:
            missing = "'image'" if not isinstance(rec.get("image"), str) or not rec["image"] else \
                "'prompt' (or 'question' / 'text')"
            raise error(f"{where} has no {missing} string", f"every line needs {fmt}")
        label = rec.get("label")
        if label is not None:
            label = str(label).strip().lower()
            if label not in LABELS:
                raise error(f"{where}: label {rec['label']!r} is not yes or no",
                            "POPE labels are \"yes\" or \"no\"; drop the label for unlabelled data")
        image = Path(rec["image"])
        records.append(Record(image if image.is_absolute() else root / image, prompt, where, label))
    if not records:
        raise error(f"the file {path} ({what}) holds no records", f"write one {fmt} object per line")
    labelled = sum(r.label is not None for r in records)
    if labelled not in (0, len(records)):
        first = next(r for r in records if r.label is None)
        raise error(f"{first.where} has no label but other lines of {path} do",
                    "label every line (POPE format) or none")
    return records
