"""`explain`: the image with the diagnostic attention map as a heat map, sources and neighbours marked."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .layout import ImageSpan
from .plan import SequencePlan

# A perceptual dark-to-bright ramp (approximates matplotlib's "inferno"), anchors at 0, .25, .5, .75, 1.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
SOURCE_COLOUR = (0, 230, 255)
NEIGHBOUR_COLOUR = (255, 255, 255)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    frac = (v - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).round().astype(np.uint8)


@dataclasses.dataclass
class ExplainData:
    image: Any                      # PIL image: the region the grids cover, as the model saw it
    span: ImageSpan
    attention: np.ndarray           # cell scores of the span (all grids)
    sources: np.ndarray             # sequence positions, best first
    neighbours: np.ndarray          # sequence positions
    entropy: float
    title: str
    details: str


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _panel(image, rows: int, cols: int, scores: np.ndarray, start: int, sources: dict[int, int],
           neighbours: set[int], size: int, overlay: bool):
    from PIL import Image, ImageDraw

    cell_w, cell_h = size / cols, size / rows
    norm = scores - scores.min()
    norm = norm / norm.max() if norm.max() > 0 else norm
    heat = Image.fromarray(colormap(norm.reshape(rows, cols))).resize((size, size), Image.NEAREST)
    if overlay:
        base = image.convert("RGB").resize((size, size), Image.BICUBIC)
        panel = Image.blend(base, heat, 0.45)
    else:
        panel = heat
    draw = ImageDraw.Draw(panel)
    font = _font(max(8, int(min(cell_w, cell_h) * 0.5)))
    for cell in range(rows * cols):
        pos = start + cell
        r, c = divmod(cell, cols)
        box = (c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1)
        if pos in neighbours:
            draw.rectangle(box, outline=NEIGHBOUR_COLOUR, width=1)
    for pos, rank in sources.items():
        cell = pos - start
        if not 0 <= cell < rows * cols:
            continue
        r, c = divmod(cell, cols)
        box = (c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1)
        draw.rectangle(box, outline=SOURCE_COLOUR, width=max(2, int(min(cell_w, cell_h) / 8)))
        if min(cell_w, cell_h) >= 14:
            draw.text((box[0] + 3, box[1] + 2), str(rank + 1), fill=(255, 255, 255), font=font, stroke_width=1,
                      stroke_fill=(0, 0, 0))
    return panel


def render(data: ExplainData, panel_size: int = 576):
    """One PNG-ready picture: a panel per grid (the last grid over the image), legend and caption below."""
    from PIL import Image, ImageDraw

    sources = {int(p): i for i, p in enumerate(data.sources)}
    neighbours = {int(p) for p in data.neighbours}
    panels, offset = [], 0
    grids = data.span.grids
    for gi, g in enumerate(grids):
        scores = data.attention[offset: offset + g.size]
        overlay = gi == len(grids) - 1  # single grid, or InternVL's thumbnail (the whole image)
        size = panel_size if overlay else panel_size // 2
        panels.append((_panel(data.image, g.rows, g.cols, scores, g.start, sources, neighbours, size, overlay),
                       "image" if len(grids) == 1 else ("thumbnail" if overlay else f"tile {gi + 1}")))
        offset += g.size
    pad = 12
    width = max(pad + sum(p.width + pad for p, _ in panels), 640)
    height_panels = max(p.height for p, _ in panels)
    caption_h = 118
    canvas = Image.new("RGB", (width, pad + 18 + height_panels + caption_h), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    small, big = _font(13), _font(17)
    x = pad
    for panel, label in panels:
        draw.text((x, pad), label, fill=(200, 200, 200), font=small)
        canvas.paste(panel, (x, pad + 18))
        x += panel.width + pad
    y = pad + 18 + height_panels + 10
    draw.text((pad, y), data.title, fill=(255, 255, 255), font=big)
    draw.text((pad, y + 26), data.details, fill=(210, 210, 210), font=small)
    ly = y + 52
    draw.rectangle((pad, ly, pad + 14, ly + 14), outline=SOURCE_COLOUR, width=3)
    draw.text((pad + 20, ly), "source (scaled by 1/lambda, rank shown)", fill=(210, 210, 210), font=small)
    draw.rectangle((pad + 320, ly, pad + 334, ly + 14), outline=NEIGHBOUR_COLOUR, width=1)
    draw.text((pad + 340, ly), "neighbour (receives (lambda-1) * h[donor])", fill=(210, 210, 210), font=small)
    bar = colormap(np.linspace(0, 1, 200))[None].repeat(12, axis=0)
    canvas.paste(Image.fromarray(bar), (pad, ly + 26))
    draw.text((pad + 206, ly + 24), "diagnostic attention: low -> high", fill=(210, 210, 210), font=small)
    return canvas


def explain_data(family: Any, image: Any, inputs: Any, plan: SequencePlan, entropy: float, config: Any) -> ExplainData:
    """Collect what the picture shows for the first image of row 0."""
    first = plan.images[0]
    scores = plan.attention[0][0]
    if scores is None:
        scores = np.zeros(first.span.size)
    row_weight = plan.weight[0, first.span.start: first.span.end]
    neighbours = first.span.start + np.flatnonzero(row_weight != 0)
    from calibration.credit_entropy import COLLAPSE_THRESHOLD_NATS

    verdict = "collapse-prone (< 4.0 nats)" if entropy < COLLAPSE_THRESHOLD_NATS else "spread (>= 4.0 nats)"
    grids = " + ".join(f"{g.rows}x{g.cols}" for g in first.span.grids)
    title = f"credit entropy H = {entropy:.2f} nats - {verdict}"
    details = (f"{family.display_name} ({family.source}) | grid {grids} | {len(first.sources)} sources, "
               f"{len(neighbours)} neighbours | k={config.k}, lambda={config.lam:g}, layers {config.layers[0]}..{config.layers[1]}, "
               f"diag {config.diag_layers[0]}..{config.diag_layers[1]}")
    if first.skipped:
        details += f" | SCR skipped: {first.skipped}"
    return ExplainData(image=family.display_image(image), span=first.span, attention=np.asarray(scores),
                       sources=first.sources, neighbours=neighbours, entropy=entropy, title=title, details=details)
