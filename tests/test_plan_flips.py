"""Plan flips judged by their margin (scr_export.plan_flips): constructed maps where the flipped patches are tied
within the candidate's map error (a near tie, allowed) and where they are far apart (a real flip, gated)."""

from __future__ import annotations

import numpy as np

from scr_export.config import SCRConfig
from scr_export.layout import Grid, ImageSpan
from scr_export.parity import ParityReport
from scr_export.plan import plan_sequence
from scr_export.plan_flips import judge_flips

SPAN = ImageSpan(3, 39, (Grid(3, 6, 6),))  # a 6x6 grid at positions 3..38; border cells are never sources
CONFIG = SCRConfig(k=2, layers=(0, 0), diag_layers=(0, 0))
B, C, A = 14, 15, 20  # inner cells: A is the best source, B the second, C the first one left out


def _plan(scores: np.ndarray):
    plan = plan_sequence([[SPAN]], [[scores]], 45, CONFIG)
    plan.attention = [[scores]]
    return plan


def _reference(gap: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0.0, 1e-3, 36)
    ref[A], ref[B] = 5e-3, 4e-3
    ref[C] = ref[B] - gap
    return ref


def _report(judged, precision="fp16"):
    return ParityReport(precision=precision, provider="test", comparisons=[], plan_identical=False,
                        plan_jaccard=0.5, scr_effect_cosine=0.7, greedy_identical=True, ref_tokens=[[1]],
                        cand_tokens=[[1]], scr_effect_cosine_same_plan=0.99, flips=judged.to_dict())


def test_patches_tied_within_the_map_error_are_a_near_tie():
    ref = _reference(gap=1e-7)
    rng = np.random.default_rng(1)
    cand = ref + rng.uniform(-1e-6, 1e-6, 36)  # the runtime's map error: about 1e-6 everywhere
    cand[C], cand[B] = ref[C] + 1e-6, ref[B] - 1e-6  # ... which swaps the two tied cells
    r, c = _plan(ref), _plan(cand)
    assert SPAN.start + B in r.images[0].sources and SPAN.start + C in c.images[0].sources
    judged = judge_flips(r, c)
    assert (judged.near_ties, judged.real_flips, judged.sources) == (1, 0, 2)
    flip = judged.flips[0]
    assert (flip.reference_cell, flip.candidate_cell) == (B, C)
    assert flip.credit_gap < flip.tolerance
    assert _report(judged)  # allowed at fp16: the diagnostic's noise


def test_patches_far_apart_are_a_real_flip():
    ref = _reference(gap=1e-4)
    rng = np.random.default_rng(2)
    cand = ref + rng.uniform(-1e-7, 1e-7, 36)  # a small map error everywhere ...
    cand[C] = ref[B] + 1e-5                     # ... but one cell moved far beyond it
    judged = judge_flips(_plan(ref), _plan(cand))
    assert (judged.near_ties, judged.real_flips) == (0, 1)
    assert judged.flips[0].credit_gap > judged.flips[0].tolerance
    report = _report(judged)
    assert not report and any("real plan flips: 1 of 2 sources" in f for f in report.failures)
    assert "1 real of 2 sources" in report.table()


def test_identical_plans_have_no_flips_and_plans_without_maps_are_not_judged():
    ref = _reference(gap=1e-4)
    judged = judge_flips(_plan(ref), _plan(ref + 1e-9))
    assert judged.flips == [] and judged.real_flip_fraction == 0.0 and judged.map_error < 2e-9
    bare = plan_sequence([[SPAN]], [[ref]], 45, CONFIG)  # no .attention: a plan passed in
    assert judge_flips(bare, _plan(ref)) is None
