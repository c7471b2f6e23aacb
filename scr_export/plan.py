"""The SCR plan (SCR.md, pass 1): sources, donors, and the per-position scale / weight / donor table."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from .config import SCRConfig
from .errors import InputError
from .layout import ImageSpan

# The 8 neighbour offsets of a cell on its grid.
NEIGHBOUR_OFFSETS = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0))


@dataclasses.dataclass(frozen=True)
class GridPlan:
    """The plan of one image on one H×W grid, indexed by cell (row-major).

    sources  cell indices of the sources, best first
    donor    for each cell, its donor's cell index, or the cell itself where it has none
    scale    1/λ for sources, 1 elsewhere
    weight   λ−1 for cells that have a donor, 0 elsewhere
    """

    grid: tuple[int, int]
    sources: np.ndarray
    donor: np.ndarray
    scale: np.ndarray
    weight: np.ndarray

    @property
    def neighbours(self) -> np.ndarray:
        """Cells that receive from a donor."""
        return np.flatnonzero(self.weight != 0)

    def apply(self, hidden: np.ndarray) -> np.ndarray:
        """h'[t] = scale[t]·h[t] + weight[t]·h[donor[t]] for an [H*W, D] array of this grid's hidden states."""
        return self.scale[:, None] * hidden + self.weight[:, None] * hidden[self.donor]


def _candidate_mask(grids: Sequence[tuple[int, int]], border: str) -> np.ndarray:
    masks = []
    for rows, cols in grids:
        m = np.ones((rows, cols), dtype=bool)
        if border == "exclude":
            m[0, :] = m[-1, :] = False
            m[:, 0] = m[:, -1] = False
        masks.append(m.ravel())
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def _plan_cells(scores: np.ndarray, grids: Sequence[tuple[int, int]], config: SCRConfig):
    """Plan one image whose cells are the concatenation of ``grids`` (row-major each).

    Returns (sources, donor, scale, weight) indexed by cell number over all grids. Ranking is across all grids
    (k per image), ties go to the lower cell number (= lower sequence position); donors stay inside their grid.
    """
    n = sum(r * c for r, c in grids)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != n:
        raise InputError(f"the attention map has {scores.shape[0]} scores but the image has {n} cells",
                         "pass one score per image cell, in row-major order of each grid")
    if not np.all(np.isfinite(scores)):
        raise InputError("the attention map contains NaN or infinite values",
                         "check the diagnostic pass: attention probabilities must be finite")
    candidates = np.flatnonzero(_candidate_mask(grids, config.border))
    # lexsort: last key is primary -> descending score, then ascending cell number
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    sources = order[: config.k].astype(np.int64)

    rank = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    rank[sources] = np.arange(sources.size)
    donor = np.arange(n, dtype=np.int64)
    is_source = np.zeros(n, dtype=bool)
    is_source[sources] = True
    offset = 0
    big = np.iinfo(np.int64).max
    for rows, cols in grids:
        size = rows * cols
        r = rank[offset: offset + size].reshape(rows, cols)
        padded = np.full((rows + 2, cols + 2), big, dtype=np.int64)
        padded[1:-1, 1:-1] = r
        # best (lowest) source rank among each cell's 8 neighbours
        best = np.full((rows, cols), big, dtype=np.int64)
        for dr, dc in NEIGHBOUR_OFFSETS:
            best = np.minimum(best, padded[1 + dr: 1 + dr + rows, 1 + dc: 1 + dc + cols])
        best = best.ravel()
        receives = (best != big) & ~is_source[offset: offset + size]
        cells = np.flatnonzero(receives)
        donor[offset + cells] = sources[best[cells]]
        offset += size
    scale = np.ones(n, dtype=np.float32)
    weight = np.zeros(n, dtype=np.float32)
    scale[sources] = np.float32(config.source_scale)
    weight[donor != np.arange(n)] = np.float32(config.neighbour_weight)
    return sources, donor, scale, weight


def plan_redistribution(attention, grid: tuple[int, int], config: SCRConfig) -> GridPlan:
    """Plan SCR for one image on one H×W grid (SCR.md, pass 1 steps 3–5).

    ``attention`` holds H*W cell scores in row-major order; ``grid`` is ``(H, W)``.
    """
    rows, cols = (int(grid[0]), int(grid[1]))
    if rows < 1 or cols < 1:
        raise InputError(f"grid {grid} is empty", "a grid needs at least one row and one column")
    sources, donor, scale, weight = _plan_cells(attention, [(rows, cols)], config)
    return GridPlan(grid=(rows, cols), sources=sources, donor=donor, scale=scale, weight=weight)


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """The plan of one image of one batch row, in sequence positions."""

    batch_index: int
    span: ImageSpan
    sources: np.ndarray          # sequence positions, best first
    skipped: str | None = None   # why SCR was skipped for this image, if it was


@dataclasses.dataclass
class SequencePlan:
    """The per-position SCR table over a whole (batched) input sequence (SCR.md, "the plan").

    scale, weight: float32 [B, T]; donor: int64 [B, T] (a position in the same row).
    """

    scale: np.ndarray
    weight: np.ndarray
    donor: np.ndarray
    images: list[ImagePlan] = dataclasses.field(default_factory=list)
    attention: list[list[np.ndarray | None]] | None = None  # the diagnostic maps it was planned from, if known

    @classmethod
    def identity(cls, batch: int, length: int) -> "SequencePlan":
        return cls(scale=np.ones((batch, length), np.float32), weight=np.zeros((batch, length), np.float32),
                   donor=np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scale.shape)  # type: ignore[return-value]

    def active(self) -> np.ndarray:
        """[B, T] mask of positions the plan changes (λ = 1 leaves none)."""
        return (self.scale != 1) | (self.weight != 0)

    @property
    def is_identity(self) -> bool:
        return not bool(self.active().any())

    def sources(self, batch_index: int = 0) -> list[np.ndarray]:
        return [p.sources for p in self.images if p.batch_index == batch_index]

    def extended(self, length: int) -> "SequencePlan":
        """The same plan over a longer sequence: new positions are untouched (decode without a KV cache)."""
        b, t = self.shape
        if length < t:
            raise ValueError(f"cannot shrink a plan of length {t} to {length}")
        out = SequencePlan.identity(b, length)
        out.scale[:, :t], out.weight[:, :t], out.donor[:, :t] = self.scale, self.weight, self.donor
        out.images = list(self.images)
        return out

    def apply(self, hidden: np.ndarray) -> np.ndarray:
        """h'[b,t] = scale·h[b,t] + weight·h[b,donor[b,t]] for hidden [B, T, D] (numpy, for tests and tools)."""
        gathered = np.take_along_axis(hidden, self.donor[:, :, None], axis=1)
        return self.scale[:, :, None] * hidden + self.weight[:, :, None] * gathered


def plan_image(scores: np.ndarray, span: ImageSpan, config: SCRConfig):
    """Plan one image spread over one or more grids; returns (sources, donor, scale, weight) in sequence positions."""
    grids = [(g.rows, g.cols) for g in span.grids]
    sources, donor, scale, weight = _plan_cells(scores, grids, config)
    return span.start + sources, span.start + donor, scale, weight


def plan_sequence(layouts: Sequence[Sequence[ImageSpan]], attention: Sequence[Sequence[np.ndarray | None]],
                  length: int, config: SCRConfig) -> SequencePlan:
    """Plan every image of every batch row.

    ``layouts[b]`` lists the image spans of row b; ``attention[b][i]`` is image i's cell scores (all its grids,
    concatenated in span order), or None when SCR is skipped for that image (no text after it).
    """
    plan = SequencePlan.identity(len(layouts), length)
    for b, spans in enumerate(layouts):
        if len(attention[b]) != len(spans):
            raise InputError(f"batch row {b} has {len(spans)} images but {len(attention[b])} attention maps",
                             "pass one attention map per image span")
        for span, scores in zip(spans, attention[b]):
            if span.end > length:
                raise InputError(f"image span {span.start}..{span.end} runs past the sequence length {length}",
                                 "compute the layout on the same input_ids as the plan")
            if scores is None:
                reason = "no text follows the image, so there are no query positions for the diagnostic map"
                warnings.warn(f"SCR skipped for the image at positions {span.start}..{span.end - 1} of row {b}: {reason}",
                              stacklevel=2)
                plan.images.append(ImagePlan(b, span, np.zeros(0, np.int64), skipped=reason))
                continue
            sources, donor, scale, weight = plan_image(scores, span, config)
            sl = slice(span.start, span.end)
            plan.scale[b, sl], plan.weight[b, sl], plan.donor[b, sl] = scale, weight, donor
            plan.images.append(ImagePlan(b, span, sources))
    return plan
