"""A synthetic POPE world: pictures of coloured shapes, yes/no questions about them, and short captions.

Deterministic (one seed, one picture), torch-free (numpy and PIL), sized for any processor. What it is for: trained
toy models (``examples/toy/train.py``) whose answers mean something, so that a parity verdict and SCR's effect on
hallucination can be measured on answers, not only on logits.

- **Objects**: 6 shapes x 6 colours, 1-4 per picture, each 18-32 % of the picture's side, placed without
  overlapping, on a textured background (low-contrast noise, stripes or a gradient in muted colours that no object
  uses).
- **A deliberate co-occurrence bias** (``PARTNERS``): in the training distribution, a picture with an anchor object
  (a red circle, say) also holds its partner (a blue square) ``bias`` of the time (default 0.85). A model that
  learns the shortcut answers "yes" to the partner when it is absent: the hallucination POPE's adversarial split
  probes.
- **Questions**: "Is there a red circle in the image?" ("an orange star") with the POPE splits' negatives: random (any absent object),
  popular (the absent objects most frequent in training) and adversarial (the absent partner of a present anchor,
  else the absent object that co-occurs most with a present one).
- **Captions**: "A red circle, a blue square and a green star." (objects left to right).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = {"red": (220, 38, 38), "green": (34, 160, 60), "blue": (40, 84, 225), "yellow": (240, 210, 30),
          "purple": (146, 56, 196), "orange": (246, 132, 24)}
# anchor -> partner: in training the partner appears with the anchor ``bias`` of the time
PARTNERS = {("red", "circle"): ("blue", "square"), ("yellow", "star"): ("purple", "triangle"),
            ("green", "diamond"): ("orange", "cross")}
SPLITS = ("random", "popular", "adversarial")
QUESTION = "Is there {} in the image?"

Obj = tuple[str, str]  # (colour, shape)


def name(obj: Obj) -> str:
    return f"{obj[0]} {obj[1]}"


def article(obj: Obj) -> str:
    """"a red circle", "an orange star"."""
    return ("an " if obj[0][0] in "aeiou" else "a ") + name(obj)


def all_objects() -> list[Obj]:
    return [(c, s) for c in COLORS for s in SHAPES]


@dataclasses.dataclass
class Scene:
    objects: list[Obj]                             # in the order drawn (left to right by centre)
    boxes: list[tuple[int, int, int, int]]         # x0, y0, x1, y1 in pixels
    size: int
    background: str

    def caption(self) -> str:
        return caption_of(self.objects)


def caption_of(objects: Sequence[Obj]) -> str:
    """"A red circle, a blue square and a green star." (the objects in the order given)."""
    names = [article(o) for o in objects]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def sample_objects(rng: np.random.Generator, bias: float) -> list[Obj]:
    """1-4 distinct objects; an anchor brings its partner with probability ``bias`` (an anchor drawn with no room
    left for its partner is drawn again, so the bias holds at 4 objects too)."""
    pool = all_objects()
    count = int(rng.integers(1, 5))
    chosen: list[Obj] = []
    while len(chosen) < count:
        obj = pool[int(rng.integers(len(pool)))]
        if obj in chosen:
            continue
        partner = PARTNERS.get(obj)
        if partner is not None and partner not in chosen and len(chosen) + 2 > 4:
            continue  # an anchor needs room for its partner (else 4-object pictures would dilute the bias)
        if partner is not None and partner not in chosen and rng.random() < bias:
            chosen += [obj, partner]
            count = max(count, len(chosen))
        else:
            chosen.append(obj)
    return chosen


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.36
        return [(cx - t, y0), (cx + t, y0), (cx + t, cy - t), (x1, cy - t), (x1, cy + t), (cx + t, cy + t),
                (cx + t, y1), (cx - t, y1), (cx - t, cy + t), (x0, cy + t), (x0, cy - t), (cx - t, cy - t)]
    return None


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    base = rng.integers(70, 190, 3).astype(np.float32)
    base = base * 0.35 + 128 * 0.65  # muted: far from every object colour's saturation
    y, x = np.mgrid[0:size, 0:size] / size
    kind = ("noise", "stripes", "gradient")[int(rng.integers(3))]
    if kind == "stripes":
        a = rng.uniform(0, math.pi)
        f = rng.uniform(4, 10)
        field = 14 * np.sign(np.sin(2 * math.pi * f * (x * math.cos(a) + y * math.sin(a))))
    elif kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        field = 40 * ((x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a))
    else:
        field = np.zeros((size, size))
    img = base[None, None, :] + field[..., None] + rng.normal(0, 9, (size, size, 3))
    return img, kind


def draw_scene(objects: Sequence[Obj], size: int, rng: np.random.Generator):
    """(PIL image, Scene) with ``objects`` placed without overlap (fewer if they do not fit)."""
    from PIL import Image, ImageDraw

    img, kind = _background(rng, size)
    pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    placed: list[tuple[Obj, tuple[int, int, int, int]]] = []
    for obj in objects:
        for _ in range(60):
            side = int(size * rng.uniform(0.18, 0.32))
            x0, y0 = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1]
                   for _, b in placed):
                placed.append((obj, box))
                break
    for (colour, shape), box in placed:
        rgb = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in COLORS[colour])
        poly = _polygon(shape, box)
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            m = (box[2] - box[0]) * 0.08
            draw.rectangle((box[0] + m, box[1] + m, box[2] - m, box[3] - m), fill=rgb)
        else:
            draw.polygon(poly, fill=rgb)
    placed.sort(key=lambda p: (p[1][0] + p[1][2]) / 2)
    return pic, Scene([o for o, _ in placed], [b for _, b in placed], size, kind)


def lone_anchor_objects(rng: np.random.Generator) -> list[Obj]:
    """An anchor without its partner, and 0-2 other objects: the picture POPE's adversarial split is about (a model
    that learned the co-occurrence answers "yes" to the absent partner)."""
    anchors = list(PARTNERS)
    anchor = anchors[int(rng.integers(len(anchors)))]
    pool = [o for o in all_objects() if o not in (anchor, PARTNERS[anchor]) and o not in PARTNERS]
    others = [pool[i] for i in rng.permutation(len(pool))[:int(rng.integers(0, 3))]]
    objs = [anchor] + others
    return [objs[i] for i in rng.permutation(len(objs))]


def make_scene(seed: int, size: int, bias: float = 0.85, lone_anchor: bool = False):
    """The picture of ``seed`` (same seed, same picture, at any ``size``'s geometry); ``lone_anchor``: an anchor
    without its partner (``lone_anchor_objects``)."""
    rng = np.random.default_rng(seed)
    objects = lone_anchor_objects(rng) if lone_anchor else sample_objects(rng, bias)
    return draw_scene(objects, size, rng)


@functools.lru_cache(maxsize=8)
def frequencies(bias: float = 0.85, samples: int = 20000, seed: int = 12345) -> dict[Obj, float]:
    """How often each object appears in the training distribution (what POPE's popular split ranks by)."""
    rng = np.random.default_rng(seed)
    counts = {o: 0 for o in all_objects()}
    for _ in range(samples):
        for o in set(sample_objects(rng, bias)):
            counts[o] += 1
    return {o: c / samples for o, c in counts.items()}


def popular_order(bias: float = 0.85) -> list[Obj]:
    """Objects from the most to the least frequent in training (POPE's popular split asks about the first absent)."""
    freq = frequencies(bias)
    return sorted(all_objects(), key=lambda o: -freq[o])


def negatives(scene: Scene, split: str, rng: np.random.Generator, popular: Sequence[Obj]) -> Obj:
    """One absent object for ``split``'s question."""
    present = set(scene.objects)
    absent = [o for o in all_objects() if o not in present]
    if split == "random":
        return absent[int(rng.integers(len(absent)))]
    if split == "popular":
        return next(o for o in popular if o not in present)
    if split == "adversarial":
        partners = [PARTNERS[o] for o in scene.objects if o in PARTNERS and PARTNERS[o] not in present]
        anchors = [a for a, p in PARTNERS.items() if p in present and a not in present]
        options = partners + anchors
        if options:
            return options[int(rng.integers(len(options)))]
        # no anchor / partner in the picture: an absent object sharing a colour or a shape with a present one
        close = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in present)]
        return (close or absent)[int(rng.integers(len(close or absent)))]
    raise ValueError(f"unknown POPE split {split!r}: use one of {', '.join(SPLITS)}")


def questions(scene: Scene, split: str, rng: np.random.Generator, popular: Sequence[Obj],
              per_image: int = 2) -> Iterator[tuple[str, str, Obj]]:
    """``per_image`` yes questions (present objects) and as many no questions (``split``'s negatives)."""
    present = list(scene.objects)
    order = rng.permutation(len(present))
    asked: set[Obj] = set()
    for i in order[:per_image]:
        yield QUESTION.format(article(present[i])), "yes", present[i]
    for _ in range(min(per_image, len(order[:per_image]))):
        for _try in range(8):
            neg = negatives(scene, split, rng, popular)
            if neg not in asked:
                break
        asked.add(neg)
        yield QUESTION.format(article(neg)), "no", neg


def confusable(scene: Scene, rng: np.random.Generator, by: str) -> Obj | None:
    """An absent object sharing a colour (``by="colour"``) or a shape (``by="shape"``) with a present one: the
    negative that only a model which binds colour to shape answers right (None if there is none)."""
    present = set(scene.objects)
    i = 0 if by == "colour" else 1
    options = [o for o in all_objects() if o not in present and any(o[i] == p[i] for p in present)]
    return options[int(rng.integers(len(options)))] if options else None


def training_pairs(seed: int, size: int, bias: float = 0.85, per_image: int = 1,
                   caption: bool = True, hard: bool = False) -> tuple[Any, list[tuple[str, str]]]:
    """A training picture and its (prompt, answer) pairs: ``per_image`` yes questions (present objects, as many as
    there are) and as many no questions (their objects drawn from one split's negatives, so the model also sees the
    partner asked about when it is absent), and the caption unless ``caption=False``. ``hard``: every second no
    question asks instead about a confusable absent object (a present colour in another shape, or a present shape
    in another colour, in turn), drawn from a generator of its own so the other questions stay as they were. The
    default (one of each and the caption) is the recipe of toy-llava's first run (README)."""
    rng = np.random.default_rng(seed)
    pic, scene = draw_scene(sample_objects(rng, bias), size, rng)
    popular = popular_order(bias)
    split = SPLITS[int(rng.integers(3))]
    asked = list(questions(scene, split, rng, popular, per_image=per_image))
    if hard:
        hard_rng = np.random.default_rng(seed + 11)
        taken = {obj for _, _, obj in asked}
        nos = [i for i, (_, a, _) in enumerate(asked) if a == "no"]
        for n, i in enumerate(nos[1::2] if len(nos) > 1 else nos):
            obj = confusable(scene, hard_rng, ("colour", "shape")[(seed + n) % 2])
            if obj is not None and obj not in taken:
                taken.add(obj)
                asked[i] = (QUESTION.format(article(obj)), "no", obj)
    pairs = [(q, "Yes" if a == "yes" else "No") for q, a, _ in asked]
    if caption:
        pairs.append(("Describe the image.", scene.caption()))
    return pic, pairs


def text_corpus(pictures: int = 3000, seed: int = 777_000_000) -> list[str]:
    """The world's text (every question, the caption request, the answers, captions of ``pictures`` scenes): what a
    trained toy preset's BPE is learned from, so its words are single tokens."""
    rng = np.random.default_rng(seed)
    texts = [QUESTION.format(article(o)) for o in all_objects()] + ["Describe the image.", "Yes", "No"]
    texts += [caption_of(sample_objects(rng, 0.85)) for _ in range(pictures)]
    return texts


EVAL_SEED = 10_000_000  # evaluation pictures are drawn from seeds at and above this; training uses seeds below
CALIB_SEED = 5_000_000  # calibration pictures: the training distribution, a range no training run reaches


def write_calibration(out: Path, size: int, n: int = 16, seed: int = CALIB_SEED) -> Path:
    """``n`` training-distribution pictures and one question each (``prompts.txt``): int8 / fp8 calibration data
    for the toy presets (``examples/shapes-calibration``), never the held-out POPE pictures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = []
    for i in range(n):
        pic, pairs = training_pairs(seed + i, size, caption=False)
        pic.save(out / f"calib-{i:03d}.png")
        prompts.append(pairs[i % len(pairs)][0])
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return out


def write_pope(out: Path, size: int, per_split: int = 100, bias: float = 0.85, seed: int = EVAL_SEED) -> dict:
    """``out/{random,popular,adversarial}.jsonl`` and their pictures (``out/images/``): ``per_split`` questions
    per split (half yes, half no), pictures from seeds no training run uses (half of the adversarial split's hold
    an anchor without its partner). Returns a summary."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    popular = popular_order(bias)
    summary = {}
    for k, split in enumerate(SPLITS):
        rows, n = [], 0
        while len(rows) < per_split:
            s = seed + k * 100_000 + n
            n += 1
            # half the adversarial split's pictures hold an anchor without its partner (what the split probes)
            pic, scene = make_scene(s, size, bias, lone_anchor=split == "adversarial" and n % 2 == 1)
            rng = np.random.default_rng(s + 7)
            file = f"images/{s}.png"
            if not (out / file).is_file():
                pic.save(out / file)
            for q, label, obj in questions(scene, split, rng, popular, per_image=1):
                rows.append({"image": file, "question": q, "label": label, "object": name(obj),
                             "objects": [name(o) for o in scene.objects], "seed": s})
        rows = rows[:per_split]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary[split] = {"questions": len(rows), "yes": sum(r["label"] == "yes" for r in rows)}
    return summary
