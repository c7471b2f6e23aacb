"""Where the image tokens are: image spans and their row-major grids, as sequence positions."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
    """A rows×cols raster of image tokens; cell (r, c) sits at sequence position ``start + r*cols + c``."""

    start: int
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def end(self) -> int:
        return self.start + self.size

    def positions(self) -> np.ndarray:
        return np.arange(self.start, self.end, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """The run of image-token positions ``[start, end)`` of one image, split into one or more grids."""

    start: int
    end: int
    grids: tuple[Grid, ...]

    def __post_init__(self) -> None:
        covered = sum(g.size for g in self.grids)
        if covered != self.end - self.start:
            raise ValueError(f"grids cover {covered} tokens but the image span has {self.end - self.start}")
        pos = self.start
        for g in self.grids:
            if g.start != pos:
                raise ValueError("grids must tile the image span in order, without gaps")
            pos = g.end

    @property
    def size(self) -> int:
        return self.end - self.start

    def positions(self) -> np.ndarray:
        return np.arange(self.start, self.end, dtype=np.int64)


def token_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True in a 1-D boolean array."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def query_mask(input_ids_row: np.ndarray, attention_mask_row: np.ndarray, spans: list[ImageSpan],
               span: ImageSpan) -> np.ndarray:
    """Text query positions for ``span``: real (unpadded) non-image tokens after the span."""
    t = np.arange(len(input_ids_row))
    mask = (t >= span.end) & (np.asarray(attention_mask_row) == 1)
    for other in spans:
        mask[other.start: other.end] = False
    return mask
