"""The plan against a deliberately simple implementation of the paper's wording (SCR.md pass 1, steps 3-5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scr_export import Grid, ImageSpan, InputError, SCRConfig, plan_redistribution, plan_sequence


def paper_plan(scores, grids, k, lam, border="exclude"):
    """Sources processed in descending order; each claims its not-yet-claimed, non-source 8-neighbours.

    ``grids`` is a list of (rows, cols); cells are numbered across the grids in order.
    """
    cells = []  # (grid, r, c)
    for gi, (rows, cols) in enumerate(grids):
        for r in range(rows):
            for c in range(cols):
                cells.append((gi, r, c))
    index = {cell: i for i, cell in enumerate(cells)}

    def is_candidate(gi, r, c):
        rows, cols = grids[gi]
        return border == "include" or (0 < r < rows - 1 and 0 < c < cols - 1)

    candidates = [i for i, cell in enumerate(cells) if is_candidate(*cell)]
    candidates.sort(key=lambda i: (-scores[i], i))
    sources = candidates[:k]
    source_set = set(sources)
    donor = list(range(len(cells)))
    claimed = set()
    for s in sources:
        gi, r, c = cells[s]
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                n = (gi, r + dr, c + dc)
                if (dr, dc) == (0, 0) or n not in index:
                    continue
                j = index[n]
                if j in source_set or j in claimed:
                    continue
                claimed.add(j)
                donor[j] = s
    scale = [1 / lam if i in source_set else 1.0 for i in range(len(cells))]
    weight = [lam - 1 if i in claimed else 0.0 for i in range(len(cells))]
    return sources, donor, scale, weight


@st.composite
def grid_case(draw):
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 9))
    # a small value set forces many ties
    levels = draw(st.integers(1, 6))
    scores = draw(st.lists(st.integers(0, levels), min_size=rows * cols, max_size=rows * cols))
    k = draw(st.integers(1, 20))
    lam = draw(st.sampled_from([1.0, 1.05, 1.1, 1.5]))
    border = draw(st.sampled_from(["exclude", "include"]))
    return rows, cols, np.array(scores, dtype=np.float64) / max(levels, 1), k, lam, border


@settings(max_examples=400, deadline=None)
@given(grid_case())
def test_single_grid_plan_matches_paper_wording(case):
    rows, cols, scores, k, lam, border = case
    plan = plan_redistribution(scores, (rows, cols), SCRConfig(k=k, lam=lam, border=border))
    sources, donor, scale, weight = paper_plan(scores, [(rows, cols)], k, lam, border)
    assert plan.sources.tolist() == sources
    assert plan.donor.tolist() == donor
    np.testing.assert_allclose(plan.scale, np.float32(scale), rtol=0, atol=0)
    np.testing.assert_allclose(plan.weight, np.float32(weight), rtol=0, atol=0)


@st.composite
def multi_grid_case(draw):
    n = draw(st.integers(1, 4))
    grids = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(n)]
    size = sum(r * c for r, c in grids)
    scores = np.array(draw(st.lists(st.integers(0, 3), min_size=size, max_size=size)), dtype=np.float64)
    return grids, scores, draw(st.integers(1, 12)), draw(st.integers(0, 5))


@settings(max_examples=200, deadline=None)
@given(multi_grid_case())
def test_multi_grid_image_ranks_across_grids_and_donates_within_its_grid(case):
    grids, scores, k, offset = case
    start = 2 + offset
    gs, pos = [], start
    for r, c in grids:
        gs.append(Grid(pos, r, c))
        pos += r * c
    span = ImageSpan(start, pos, tuple(gs))
    length = pos + 3
    plan = plan_sequence([[span]], [[scores]], length, SCRConfig(k=k))
    sources, donor, scale, weight = paper_plan(scores, grids, k, 1.1)
    assert plan.images[0].sources.tolist() == [start + s for s in sources]
    assert plan.donor[0, start:pos].tolist() == [start + d for d in donor]
    np.testing.assert_array_equal(plan.scale[0, start:pos], np.float32(scale))
    np.testing.assert_array_equal(plan.weight[0, start:pos], np.float32(weight))
    # text positions are untouched
    assert plan.donor[0, :start].tolist() == list(range(start))
    assert not plan.active()[0, :start].any() and not plan.active()[0, pos:].any()


def test_ties_go_to_the_lower_position():
    scores = np.zeros(25)
    plan = plan_redistribution(scores, (5, 5), SCRConfig(k=3))
    assert plan.sources.tolist() == [6, 7, 8]  # interior cells in row-major order


def test_border_cells_are_never_sources_but_may_receive():
    scores = np.arange(16, dtype=float)[::-1].copy()  # cell 0 (a corner) has the top score
    plan = plan_redistribution(scores, (4, 4), SCRConfig(k=1))
    assert plan.sources.tolist() == [5]
    assert set(plan.neighbours.tolist()) == {0, 1, 2, 4, 6, 8, 9, 10}
    assert (plan.donor[plan.neighbours] == 5).all()


def test_fewer_candidates_than_k():
    plan = plan_redistribution(np.ones(9), (3, 3), SCRConfig(k=32))
    assert plan.sources.tolist() == [4]
    assert plan.neighbours.size == 8


def test_grid_without_interior_has_empty_plan():
    plan = plan_redistribution(np.ones(8), (2, 4), SCRConfig(k=4))
    assert plan.sources.size == 0 and (plan.scale == 1).all() and (plan.weight == 0).all()


def test_lambda_one_is_identity():
    plan = plan_redistribution(np.random.default_rng(0).random(64), (8, 8), SCRConfig(k=8, lam=1.0))
    h = np.random.default_rng(1).standard_normal((64, 5))
    assert np.array_equal(plan.apply(h), h)


def test_neighbours_receive_the_unscaled_donor_state():
    plan = plan_redistribution(np.arange(25, dtype=float), (5, 5), SCRConfig(k=1, lam=1.1))
    h = np.random.default_rng(0).standard_normal((25, 3))
    out = plan.apply(h)
    s = plan.sources[0]
    np.testing.assert_allclose(out[s], h[s] / 1.1, rtol=1e-6)
    for n in plan.neighbours:
        np.testing.assert_allclose(out[n], h[n] + 0.1 * h[s], rtol=1e-6)


@pytest.mark.parametrize("bad, msg", [
    (dict(attention=np.ones(8), grid=(3, 3)), "8 scores but the image has 9 cells"),
    (dict(attention=np.array([np.nan] * 9), grid=(3, 3)), "NaN"),
    (dict(attention=np.ones(0), grid=(0, 3)), "empty"),
])
def test_bad_plan_input_is_rejected_with_a_reason(bad, msg):
    with pytest.raises(InputError, match=msg):
        plan_redistribution(bad["attention"], bad["grid"], SCRConfig())


def test_sequence_plan_batch_rows_are_independent_and_skipped_images_warn():
    g1 = ImageSpan(1, 10, (Grid(1, 3, 3),))
    g2 = ImageSpan(3, 12, (Grid(3, 3, 3),))
    scores = np.arange(9, dtype=float)
    with pytest.warns(UserWarning, match="no text follows"):
        plan = plan_sequence([[g1], [g2]], [[scores], [None]], 14, SCRConfig(k=1))
    assert plan.images[0].sources.tolist() == [1 + 4]
    assert plan.images[1].skipped and not plan.active()[1].any()
    h = np.random.default_rng(0).standard_normal((2, 14, 4))
    out = plan.apply(h)
    np.testing.assert_array_equal(out[1], h[1])
    ext = plan.extended(20)
    assert ext.shape == (2, 20) and np.array_equal(ext.donor[:, :14], plan.donor)
