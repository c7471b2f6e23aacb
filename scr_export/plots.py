"""The project's pictures, drawn with matplotlib in one style: ``explain``'s attention heat map and ``validate``'s
per-sample and per-layer figures. Figures are drawn off-screen (Agg) and written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CMAP = "inferno"                 # the attention heat map
SOURCE_COLOUR = "#00e6ff"        # (0, 230, 255): SCR sources
NEIGHBOUR_COLOUR = "#ffffff"     # their neighbours
SERIES = ("#00e6ff", "#f98e09", "#bc3754", "#9cdb5b")  # one colour per plotted series
STYLE = {
    "figure.facecolor": "#18181c", "axes.facecolor": "#202026", "savefig.facecolor": "#18181c",
    "text.color": "#dcdcdc", "axes.labelcolor": "#dcdcdc", "axes.edgecolor": "#7a7a80",
    "xtick.color": "#c8c8c8", "ytick.color": "#c8c8c8", "grid.color": "#3a3a40", "font.size": 10,
    "axes.titlesize": 11, "legend.facecolor": "#202026", "legend.edgecolor": "#7a7a80",
}


def figure(width_in: float, height_in: float):
    """A figure in the house style, not attached to any GUI (no pyplot state)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width_in, height_in), dpi=100)
    fig.set_facecolor(STYLE["figure.facecolor"])
    return fig


def styled():
    """Context manager: the house style for drawing into a figure."""
    import matplotlib

    return matplotlib.rc_context(STYLE)


def save_png(picture, path: str | Path) -> None:
    """Write a figure or a PIL image to ``path`` atomically (a half-written picture is worse than none), with the
    permissions of a plain new file (not mkstemp's private 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        if hasattr(picture, "savefig"):
            picture.savefig(tmp, format="png", facecolor=picture.get_facecolor())
        else:
            picture.save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_image(fig):
    """The figure as a PIL image (RGB)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _gap(cosines) -> np.ndarray:
    """1 - cosine, floored at 1e-12 (float64 round-off) so a log axis can show exact agreement."""
    return np.maximum(1 - np.asarray(cosines, np.float64), 1e-12)


def validation_figure(report: Any | None, layers: dict[str, list[dict]] | None, gates: dict[str, dict]):
    """``validate``'s picture: per-sample logits cosine and SCR effect (reference's plan) with the gates as lines
    (``report``: a ``DatasetReport``), and the per-layer hidden-state error with and without SCR, SCR layers shaded
    (``layers``: ``parity.layer_parity``'s result). Either may be None."""
    panels = [p for p in (report, layers) if p]
    fig = figure(10, 3.8 * len(panels))
    with styled():
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        k = 0
        if report:
            ax = axes[k]
            k += 1
            x = np.arange(len(report.samples))
            for j, (name, comp) in enumerate(report.comparisons.items()):
                reps = [s["reports"][name] for s in report.samples]
                cos = [min(c["cosine"] for c in r["comparisons"]) for r in reps]
                eff = [r["scr_effect_cosine_same_plan"] if r["scr_effect_cosine_same_plan"] is not None
                       else r["scr_effect_cosine"] for r in reps]
                colour = SERIES[j % len(SERIES)]
                ax.plot(x, _gap(cos), "o", color=colour, label=f"{name}: logits cosine (min)")
                ax.plot(x, _gap(eff), "^", color=colour, mfc="none", label=f"{name}: SCR effect (ref. plan)")
                gate = gates.get(comp.precision, {})
                for key, style in (("cosine", "-"), ("scr_effect_cosine_same_plan", "--")):
                    if key in gate:
                        ax.axhline(1 - gate[key], color=colour, ls=style, lw=0.9, alpha=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("sample")
            ax.set_ylabel("1 - cosine vs reference")
            ax.set_title(f"{len(report.samples)} samples; lines: the gates (the 95th percentile of 1 - cosine "
                         "must stay under them)")
            ax.grid(True, alpha=0.4)
            ax.legend(loc="lower left", fontsize=8)
        if layers:
            ax = axes[k]
            for j, (name, rows) in enumerate(layers.items()):
                li = [r["layer"] for r in rows]
                colour = SERIES[j % len(SERIES)]
                for tag, style in (("scr", "-o"), ("off", "--s")):
                    ax.plot(li, _gap([r[f"cosine_{tag}"] for r in rows]), style, color=colour, ms=4,
                            label=f"{name}, {'with SCR' if tag == 'scr' else 'without SCR'}")
            for r in next(iter(layers.values())):
                if r["scr_layer"]:
                    ax.axvspan(r["layer"] - 0.5, r["layer"] + 0.5, color=SOURCE_COLOUR, alpha=0.12, lw=0)
            ax.set_yscale("log")
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("decoder layer (shaded: SCR layers)")
            ax.set_ylabel("1 - cosine of the hidden state")
            ax.set_title("per-layer error against the reference (first sample)")
            ax.grid(True, alpha=0.4)
            ax.legend(fontsize=8)
        fig.tight_layout()
    return fig


def world_figure(samples: list[tuple[Any, str, str]], columns: int = 4):
    """The shapes world at a glance: each sample's picture with its caption and one POPE question and answer
    (``[(PIL image, caption, "question -> answer")]``)."""
    rows = (len(samples) + columns - 1) // columns
    fig = figure(3.0 * columns, 3.9 * rows)
    with styled():
        for i, (pic, caption, qa) in enumerate(samples):
            ax = fig.add_subplot(rows, columns, i + 1)
            ax.imshow(np.asarray(pic), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_wrap(caption, 34), fontsize=8)
            ax.set_xlabel(_wrap(qa, 38), fontsize=8)
        fig.tight_layout(h_pad=1.5)
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
