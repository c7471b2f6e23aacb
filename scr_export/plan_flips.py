"""Plan flips judged by their margin. A source the candidate runtime picked where the reference picked another is a
*near tie* when the reference's attention credits of the two patches differ by no more than the candidate's
measured attention-map error on that image could move them: 2·e, e = the 95th percentile of |A_cand − A_ref| over
the image's cells (each of the two cells moved by a typical error, in opposite directions). Any other flip is a
*real flip*: the deployed diagnostic is wrong at those cells by more than its typical error, which a user should
act on (a clipped activation, a broken kernel), not noise.

(The error at the two cells themselves cannot be the yardstick: a candidate ranking q above p has, by arithmetic,
moved the two by at least their gap, so every flip would pass.)

Flipped pairs are matched by rank: the reference's dropped sources and the candidate's added ones, each ordered by
the reference's credit, best first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Flip:
    image: int            # index into the plan's images
    reference_cell: int   # the reference's source the candidate dropped (the image's cell number)
    candidate_cell: int   # the cell the candidate took instead (-1: none)
    credit_gap: float | None  # |A_ref[reference_cell] - A_ref[candidate_cell]| (None: no cell took its place)
    error: float          # |ΔA| at the two cells, summed: how far the candidate's arithmetic moved them
    tolerance: float      # 2 · the 95th percentile of |ΔA| over the image: what its typical error can swap
    near_tie: bool


@dataclasses.dataclass
class FlipJudgement:
    sources: int                    # the reference's sources over the images compared
    flips: list[Flip]
    map_error: float                # max |A_cand - A_ref| over every image's cells
    map_error_rel: float            # ... relative to max |A_ref|

    @property
    def near_ties(self) -> int:
        return sum(f.near_tie for f in self.flips)

    @property
    def real_flips(self) -> int:
        return sum(not f.near_tie for f in self.flips)

    @property
    def real_flip_fraction(self) -> float:
        return self.real_flips / self.sources if self.sources else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "near_ties": self.near_ties, "real_flips": self.real_flips,
                "real_flip_fraction": self.real_flip_fraction, "map_error": self.map_error,
                "map_error_rel": self.map_error_rel, "flips": [dataclasses.asdict(f) for f in self.flips]}


def _maps(plan: Any) -> list[np.ndarray | None]:
    attention = getattr(plan, "attention", None)
    return [m for row in attention for m in row] if attention else []


def judge_flips(reference_plan: Any, candidate_plan: Any) -> FlipJudgement | None:
    """The flips between two plans of the same inputs, each carrying the attention maps it was made from
    (``plan.attention``); None when either has no maps (a plan passed in, or SCR off)."""
    ref_maps, cand_maps = _maps(reference_plan), _maps(candidate_plan)
    if not ref_maps or not cand_maps or len(ref_maps) != len(cand_maps):
        return None
    flips, sources, err_max, ref_max = [], 0, 0.0, 0.0
    for i, (ref_img, cand_img, a_ref, a_cand) in enumerate(zip(reference_plan.images, candidate_plan.images,
                                                              ref_maps, cand_maps)):
        if a_ref is None or a_cand is None:
            continue
        a_ref, a_cand = np.asarray(a_ref, np.float64), np.asarray(a_cand, np.float64)
        err = np.abs(a_cand - a_ref)
        err_max, ref_max = max(err_max, float(err.max())), max(ref_max, float(np.abs(a_ref).max()))
        start = ref_img.span.start  # sources are sequence positions; the maps are indexed by the image's cells
        ref_src = {int(c) - start for c in ref_img.sources}
        cand_src = {int(c) - start for c in cand_img.sources}
        sources += len(ref_src)
        dropped = sorted(ref_src - cand_src, key=lambda c: -a_ref[c])
        added = sorted(cand_src - ref_src, key=lambda c: -a_ref[c])
        tolerance = 2 * float(np.percentile(err, 95))
        for p, q in zip(dropped, added):
            gap = abs(a_ref[p] - a_ref[q])
            flips.append(Flip(i, p, q, float(gap), float(err[p] + err[q]), tolerance, bool(gap <= tolerance)))
        for p in dropped[len(added):]:  # a source with no replacement (fewer candidates): never a tie
            flips.append(Flip(i, p, -1, None, float(err[p]), tolerance, False))
    return FlipJudgement(sources, flips, err_max, err_max / ref_max if ref_max else 0.0)
