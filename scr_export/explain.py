"""`explain`: the image with the diagnostic attention map as a heat map, sources and neighbours marked."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .layout import ImageSpan
from .plan import SequencePlan



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


def _panel(ax, image, rows: int, cols: int, scores: np.ndarray, start: int, sources: dict[int, int],
           neighbours: set[int], overlay: bool, label: str) -> Any:
    from matplotlib.patches import Rectangle

    from .plots import CMAP, NEIGHBOUR_COLOUR, SOURCE_COLOUR

    norm = scores - scores.min()
    norm = norm / norm.max() if norm.max() > 0 else norm
    if overlay:  # the image under the map, cell (r, c) spanning [c, c+1] x [r, r+1]
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, cols, rows, 0), interpolation="bicubic")
    heat = ax.imshow(norm.reshape(rows, cols), cmap=CMAP, vmin=0, vmax=1, extent=(0, cols, rows, 0),
                     interpolation="nearest", alpha=0.45 if overlay else 1.0)
    for pos in neighbours:
        cell = pos - start
        if 0 <= cell < rows * cols:
            r, c = divmod(cell, cols)
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor=NEIGHBOUR_COLOUR, lw=0.7))
    big = 576 / max(rows, cols) >= 14  # room for the rank inside a cell
    for pos, rank in sources.items():
        cell = pos - start
        if not 0 <= cell < rows * cols:
            continue
        r, c = divmod(cell, cols)
        ax.add_patch(Rectangle((c + 0.06, r + 0.06), 0.88, 0.88, fill=False, edgecolor=SOURCE_COLOUR, lw=2.4,
                               antialiased=False))
        if big:
            ax.text(c + 0.12, r + 0.12, str(rank + 1), color="white", fontsize=7, va="top", ha="left",
                    fontweight="bold")
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(label, fontsize=9)
    return heat


def render(data: ExplainData, panel_size: int = 576):
    """One picture (a PIL image): a panel per grid (the last grid over the image), legend, colour bar and caption;
    drawn with matplotlib in the house style (``scr_export.plots``)."""
    from matplotlib.lines import Line2D

    from .plots import NEIGHBOUR_COLOUR, SOURCE_COLOUR, figure, styled, to_image

    sources = {int(p): i for i, p in enumerate(data.sources)}
    neighbours = {int(p) for p in data.neighbours}
    grids = data.span.grids
    widths = [2 if gi == len(grids) - 1 else 1 for gi in range(len(grids))]  # the image panel twice as large
    fig = figure(max(6.6, panel_size / 100 * sum(widths) / 2 + 0.4), panel_size / 100 + 2.0)
    with styled():
        gs = fig.add_gridspec(2, len(grids), width_ratios=widths, height_ratios=[panel_size / 100, 1.6],
                              left=0.03, right=0.97, top=0.95, bottom=0.03, hspace=0.12)
        offset = 0
        for gi, g in enumerate(grids):
            scores = np.asarray(data.attention[offset: offset + g.size], np.float64)
            overlay = gi == len(grids) - 1  # single grid, or InternVL's thumbnail (the whole image)
            label = "image" if len(grids) == 1 else ("thumbnail" if overlay else f"tile {gi + 1}")
            _panel(fig.add_subplot(gs[0, gi]), data.image, g.rows, g.cols, scores, g.start, sources,
                          neighbours, overlay, label)
            offset += g.size
        cap = fig.add_subplot(gs[1, :])
        cap.axis("off")
        cap.text(0, 0.95, data.title, fontsize=13, fontweight="bold", va="top", transform=cap.transAxes)
        cap.text(0, 0.68, data.details, fontsize=8.5, va="top", transform=cap.transAxes, wrap=True)
        handles = [Line2D([], [], marker="s", ls="none", mfc="none", mec=SOURCE_COLOUR, mew=2.4, ms=10,
                          label="source (scaled by 1/λ, rank shown)"),
                   Line2D([], [], marker="s", ls="none", mfc="none", mec=NEIGHBOUR_COLOUR, mew=0.8, ms=10,
                          label="neighbour (receives (λ−1)·h[donor])")]
        cap.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 0.0), ncol=1, fontsize=8.5, frameon=False)
        bar = fig.add_axes((0.6, 0.07, 0.36, 0.022))
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        from .plots import CMAP

        scale = ScalarMappable(norm=Normalize(0, 1), cmap=CMAP)  # opaque, whatever the panels' overlay
        fig.colorbar(scale, cax=bar, orientation="horizontal", label="diagnostic attention: low → high", ticks=[])
    return to_image(fig)


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
