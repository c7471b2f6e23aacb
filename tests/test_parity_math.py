"""parity.py's arithmetic, checked against numbers worked out here by hand or with plain loops over small arrays.

The parity tests of every runtime trust ``Comparison.of``, ``_cos``, ``_kl``, ``_jaccard`` and the gate checks of
``ParityReport``; these tests make sure those numbers mean what DESIGN.md says they mean.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from scr_export.errors import SCRExportError
from scr_export.parity import GATES, Comparison, ParityReport, _cos, _jaccard, _kl

FP16_MIN = -65504.0   # what Chameleon's head writes into image-token logits in fp16
FP32_MIN = float(np.finfo(np.float32).min)


# -- plain-loop formulas, written independently of parity.py ---------------------------------------------------

def _rows(x):
    x = np.asarray(x, dtype=np.float64)
    return [list(map(float, r)) for r in x.reshape(-1, x.shape[-1])]


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kl_rows(ref, cand, keep=None):
    """mean over rows of Σ_i p_i (log p_i − log q_i), p = softmax(ref row), q = softmax(cand row), on columns keep."""
    total, rows = 0.0, list(zip(_rows(ref), _rows(cand)))
    for r, c in rows:
        if keep is not None:
            r, c = [v for v, k in zip(r, keep) if k], [v for v, k in zip(c, keep) if k]
        p, q = _softmax(r), _softmax(c)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(rows)


def _norm(values):
    return math.sqrt(sum(v * v for v in values))


def _flat(x):
    return [float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1)]


# -- Comparison.of -----------------------------------------------------------------------------------------------

def test_every_number_of_a_small_comparison():
    ref = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, -1.0]])
    cand = np.array([[1.1, 2.0, 2.9], [3.5, 0.5, -1.0]])
    c = Comparison.of("logits", cand, ref)
    assert c.name == "logits"
    # max |Δ| = |3.5 − 4| = 0.5; max rel = 0.5 / max|ref| = 0.5 / 4
    assert c.max_abs == pytest.approx(0.5, abs=1e-15)
    assert c.max_rel == pytest.approx(0.125, abs=1e-15)
    r, k = _flat(ref), _flat(cand)
    dot = sum(a * b for a, b in zip(r, k))
    assert c.cosine == pytest.approx(dot / (_norm(r) * _norm(k)), rel=1e-14)
    assert c.norm_ratio == pytest.approx(_norm(k) / _norm(r), rel=1e-14)
    assert c.top1 == 1.0  # row 0: argmax 2 in both; row 1: argmax 0 in both
    assert c.kl == pytest.approx(_kl_rows(ref, cand), rel=1e-12)
    assert c.kl > 0


def test_max_rel_is_max_abs_error_over_max_abs_reference_not_elementwise():
    ref = np.array([[10.0, 0.001]])
    cand = np.array([[10.0, 0.002]])
    c = Comparison.of("x", cand, ref)
    assert c.max_abs == pytest.approx(0.001)
    assert c.max_rel == pytest.approx(1e-4)  # elementwise it would be 1.0 (100 % off on the small entry)
    neg = Comparison.of("x", -cand, -ref)  # max |ref| uses absolute values
    assert neg.max_rel == pytest.approx(1e-4)


def test_a_scaled_candidate_has_cosine_one_and_the_scale_as_norm_ratio():
    ref = np.array([[0.5, -2.0, 1.0, 3.0]])
    c = Comparison.of("x", 2 * ref, ref)
    assert c.cosine == pytest.approx(1.0, abs=1e-15)
    assert c.norm_ratio == pytest.approx(2.0, abs=1e-15)
    assert c.max_abs == pytest.approx(3.0) and c.max_rel == pytest.approx(1.0)
    assert c.top1 == 1.0
    half = Comparison.of("x", 0.5 * ref, ref)
    assert half.norm_ratio == pytest.approx(0.5)


def test_orthogonal_and_opposite_candidates():
    assert Comparison.of("x", np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])).cosine == pytest.approx(0.0, abs=1e-15)
    opp = Comparison.of("x", np.array([[-1.0, -2.0]]), np.array([[1.0, 2.0]]))
    assert opp.cosine == pytest.approx(-1.0) and opp.top1 == 0.0


def test_top1_is_the_fraction_of_rows_whose_argmax_agrees():
    ref = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    cand = np.array([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 4.0]])  # row 1 disagrees
    assert Comparison.of("x", cand, ref).top1 == pytest.approx(2 / 3)
    # over the last axis of a 3-D array: [steps, batch, vocab]
    assert Comparison.of("x", cand[None], ref[None]).top1 == pytest.approx(2 / 3)


def test_identical_inputs_give_zero_error_and_zero_kl():
    ref = np.random.default_rng(0).normal(size=(3, 5, 7))
    c = Comparison.of("x", ref.copy(), ref)
    assert (c.max_abs, c.max_rel, c.top1, c.kl) == (0.0, 0.0, 1.0, 0.0)
    assert c.cosine == pytest.approx(1.0, abs=1e-15) and c.norm_ratio == pytest.approx(1.0, abs=1e-15)


def test_masked_logits_are_left_out_of_every_number():
    # column 2 is masked on every row (Chameleon's image tokens): -65504 in the fp16 reference, -3.4e38 in the
    # fp32 candidate; those entries differ by 3e38 but must not count
    ref = np.array([[1.0, 2.0, FP16_MIN, 0.5], [0.0, -1.0, FP16_MIN, 3.0]])
    cand = np.array([[1.0, 2.5, FP32_MIN, 0.5], [0.0, -1.0, FP32_MIN, 2.0]])
    c = Comparison.of("logits", cand, ref)
    assert c.max_abs == pytest.approx(1.0)            # |2.0 − 3.0| on row 1, col 3
    assert c.max_rel == pytest.approx(1.0 / 3.0)      # max |ref| over unmasked entries is 3, not 65504
    keep = [True, True, False, True]
    r = [v for row in _rows(ref) for v, k in zip(row, keep) if k]
    k_ = [v for row in _rows(cand) for v, k in zip(row, keep) if k]
    assert c.cosine == pytest.approx(sum(a * b for a, b in zip(r, k_)) / (_norm(r) * _norm(k_)), rel=1e-14)
    assert c.norm_ratio == pytest.approx(_norm(k_) / _norm(r), rel=1e-14)
    assert c.top1 == 1.0
    assert c.kl == pytest.approx(_kl_rows(ref, cand, keep), rel=1e-12)
    assert np.isfinite(c.kl) and c.kl > 0


def test_the_mask_threshold_is_minus_65504_inclusive():
    ref = np.array([[1.0, FP16_MIN]])
    masked = Comparison.of("x", np.array([[1.0, FP16_MIN - 1e30]]), ref)
    assert masked.max_abs == 0.0 and masked.kl == 0.0
    # -65503 is an ordinary (very negative) logit: it counts
    not_masked = Comparison.of("x", np.array([[1.0, -65503.0]]), np.array([[1.0, -65500.0]]))
    assert not_masked.max_abs == pytest.approx(3.0)
    assert not_masked.max_rel == pytest.approx(3.0 / 65500.0)


def test_mismatched_masks_are_infinitely_wrong():
    ref = np.array([[1.0, FP16_MIN, 2.0]])
    cand = np.array([[1.0, 0.0, 2.0]])  # the candidate forgot to mask column 1
    c = Comparison.of("logits", cand, ref)
    assert c.max_abs == math.inf and c.max_rel == math.inf and c.kl == math.inf
    assert (c.cosine, c.norm_ratio, c.top1) == (0.0, 0.0, 0.0)
    c2 = Comparison.of("logits", ref, cand)  # and the other way round
    assert c2.max_rel == math.inf


def test_a_shape_mismatch_is_a_clear_error():
    with pytest.raises(SCRExportError, match=r"logits: candidate shape \(1, 3\) != reference \(1, 4\)") as info:
        Comparison.of("logits", np.zeros((1, 3)), np.zeros((1, 4)))
    assert info.value.fix


# -- _kl, _cos, _jaccard -----------------------------------------------------------------------------------------

def test_kl_of_a_worked_example():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    ref, cand = np.array([[0.0, 0.0]]), np.array([[0.0, math.log(3.0)]])
    want = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert _kl(ref, cand, np.zeros_like(ref, bool)) == pytest.approx(want, rel=1e-12)
    # KL(ref || cand), not the reverse: KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2)
    assert _kl(cand, ref, np.zeros_like(ref, bool)) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # logits are shift-invariant
    assert _kl(ref, cand + 100.0, np.zeros_like(ref, bool)) == pytest.approx(want, rel=1e-9)


def test_kl_is_the_mean_over_positions_and_drops_masked_columns():
    ref = np.array([[[0.0, 0.0, 9.0]], [[1.0, 0.0, 9.0]]])  # [steps, batch, vocab]
    cand = np.array([[[0.0, math.log(3.0), -9.0]], [[1.0, 0.0, -9.0]]])
    masked = np.zeros_like(ref, bool)
    masked[..., 2] = True
    want = (0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0) + 0.0) / 2
    assert _kl(ref, cand, masked) == pytest.approx(want, rel=1e-12)
    # without the mask the third column dominates
    assert _kl(ref, cand, np.zeros_like(masked)) > 1.0


def test_cos_flattens_and_zeroes_masked_entries():
    assert _cos(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 0.0, 0.0, 1.0])) == pytest.approx(1.0)
    a = np.array([1.0, 2.0, FP16_MIN])
    b = np.array([2.0, 1.0, 5.0])
    assert _cos(a, b) == pytest.approx(4.0 / (math.sqrt(5.0) * math.sqrt(30.0)), rel=1e-14)
    assert _cos(np.array([3.0, -4.0]), np.array([-3.0, 4.0])) == pytest.approx(-1.0)
    assert _cos(np.zeros(3), np.ones(3)) == 0.0  # no effect at all: cosine 0, not NaN


def test_jaccard_of_source_sets():
    assert _jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5)
    assert _jaccard(np.array([5, 6], np.int64), [6, 5]) == 1.0  # order does not matter
    assert _jaccard([1, 2], [3]) == 0.0
    assert _jaccard([], []) == 1.0          # two skipped images agree
    assert _jaccard([1], []) == 0.0
    assert _jaccard([1, 1, 2], [1, 2]) == 1.0  # sets, not lists


# -- ParityReport gates ------------------------------------------------------------------------------------------

def test_gates_are_designs_table():
    """DESIGN.md's starting points, with plan agreement judged by margin (issue 12): near ties pass, real flips and
    the diagnostic map error are gated, the SCR effect is gated with the reference's plan."""
    assert GATES["fp32"] == {"max_rel": 1e-4, "plan_identical": True, "greedy_identical": True,
                             "real_flip_fraction": 0.0, "map_error_rel": 1e-4}
    assert GATES["fp16"] == {"cosine": 0.999, "norm_ratio": 0.01, "real_flip_fraction": 0.0}
    assert GATES["int8"] == {"cosine": 0.99, "norm_ratio": 0.05, "scr_effect_cosine_same_plan": 0.95,
                             "real_flip_fraction": 0.05, "map_error_rel": 1e-2}
    assert GATES["4bit"] == {"cosine": 0.97, "norm_ratio": 0.1, "scr_effect_cosine_same_plan": 0.9,
                             "real_flip_fraction": 0.1, "map_error_rel": 0.1}


def _comparison(name="prefill logits (SCR)", max_rel=0.0, cosine=1.0, norm_ratio=1.0):
    return Comparison(name, max_abs=max_rel, max_rel=max_rel, cosine=cosine, norm_ratio=norm_ratio, top1=1.0, kl=0.0)


def _flips(real=0, near=0, sources=32, map_error_rel=0.0):
    """A FlipJudgement.to_dict() as parity reads it (counts written out here, not computed by the code)."""
    return {"sources": sources, "near_ties": near, "real_flips": real, "real_flip_fraction": real / sources,
            "map_error": map_error_rel, "map_error_rel": map_error_rel, "flips": []}


def _report(precision, comparisons=None, **fields):
    base = dict(plan_identical=True, plan_jaccard=1.0, scr_effect_cosine=1.0, greedy_identical=True,
                scr_effect_cosine_same_plan=1.0)
    base.update(fields)
    return ParityReport(precision=precision, provider="test", comparisons=comparisons or [_comparison()],
                        ref_tokens=[[1, 2]], cand_tokens=[[1, 2]], **base)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "4bit", "report"])
def test_a_perfect_report_passes(precision):
    r = _report(precision)
    assert r and r.failures == []
    d = r.to_dict()
    assert d["passed"] is True and d["gates"] == GATES[precision]
    assert "PASS" in r.table()


@pytest.mark.parametrize("precision, comparison, fields, message", [
    ("fp32", dict(name="decode logits x4", max_rel=2e-4), {}, "decode logits x4: max rel. error 2.00e-04 > 1e-04"),
    ("fp32", {}, dict(plan_identical=False), "the plan differs from the reference's (sources or donors)"),
    ("fp32", {}, dict(greedy_identical=False), "greedy tokens differ from the reference's"),
    ("fp16", dict(cosine=0.998), {}, "prefill logits (SCR): cosine 0.99800 < 0.999"),
    ("fp16", dict(norm_ratio=1.02), {}, "prefill logits (SCR): |norm ratio - 1| = 0.0200 > 0.01"),
    ("fp16", dict(norm_ratio=0.98), {}, "prefill logits (SCR): |norm ratio - 1| = 0.0200 > 0.01"),  # too small fails as well
    ("fp16", {}, dict(flips=_flips(real=1, near=2)),
     "real plan flips: 1 of 32 sources (0.031 > 0.0; near ties, allowed: 2)"),
    ("int8", {}, dict(flips=_flips(real=2)), "real plan flips: 2 of 32 sources (0.062 > 0.05; near ties, allowed: 0)"),
    ("int8", {}, dict(flips=_flips(map_error_rel=0.02)), "diagnostic map error 2.00e-02 (relative) > 1e-02"),
    ("fp32", {}, dict(flips=_flips(map_error_rel=2e-4)), "diagnostic map error 2.00e-04 (relative) > 1e-04"),
    ("int8", dict(cosine=0.98), {}, "prefill logits (SCR): cosine 0.98000 < 0.99"),
    ("int8", dict(norm_ratio=1.06), {}, "prefill logits (SCR): |norm ratio - 1| = 0.0600 > 0.05"),
    ("int8", {}, dict(scr_effect_cosine_same_plan=0.94), "SCR effect cosine with the reference's plan 0.9400 < 0.95"),
    ("4bit", dict(cosine=0.96), {}, "prefill logits (SCR): cosine 0.96000 < 0.97"),
    ("4bit", dict(norm_ratio=0.85), {}, "prefill logits (SCR): |norm ratio - 1| = 0.1500 > 0.1"),
    ("4bit", {}, dict(scr_effect_cosine_same_plan=0.89), "SCR effect cosine with the reference's plan 0.8900 < 0.9"),
    ("fp16", dict(cosine=float("nan")), {}, "prefill logits (SCR): cosine nan < 0.999"),  # NaN never passes
    ("fp32", dict(max_rel=float("nan")), {}, "prefill logits (SCR): max rel. error nan > 1e-04"),
])
def test_each_gate_fails_with_a_message_that_names_it(precision, comparison, fields, message):
    r = _report(precision, [_comparison(**comparison)], **fields)
    assert not r
    assert r.failures == [message], r.failures
    assert r.to_dict()["passed"] is False
    assert "FAIL" in r.table() and message in r.table()


@pytest.mark.parametrize("precision, comparison, fields", [
    ("fp32", dict(max_rel=1e-4), {}),
    ("fp16", dict(cosine=0.999, norm_ratio=1.0078125), dict(flips=_flips(near=5))),  # |Δ| = 2^-7: exact in binary
    ("int8", dict(cosine=0.99), dict(scr_effect_cosine_same_plan=0.95, flips=_flips(real=1, map_error_rel=1e-2))),
    ("4bit", dict(cosine=0.97, norm_ratio=0.9375), dict(scr_effect_cosine_same_plan=0.9, flips=_flips(real=3))),
])
def test_values_on_the_threshold_pass(precision, comparison, fields):
    r = _report(precision, [_comparison(**comparison)], **fields)
    assert r, r.failures


def test_gates_of_other_precisions_do_not_apply():
    # fp32 does not gate cosine / plan Jaccard; quantized gates do not ask for an identical plan or greedy tokens
    assert _report("fp32", plan_jaccard=0.0, scr_effect_cosine=0.0)
    assert _report("int8", plan_identical=False, greedy_identical=False, plan_jaccard=0.0, scr_effect_cosine=0.0)
    assert _report("fp16", plan_identical=False, greedy_identical=False, scr_effect_cosine=-1.0, plan_jaccard=0.0,
                   flips=_flips(near=4, map_error_rel=0.5))
    # "report" gates nothing
    assert _report("report", [_comparison(max_rel=1.0, cosine=0.0, norm_ratio=3.0)], plan_identical=False,
                   plan_jaccard=0.0, scr_effect_cosine=0.0, greedy_identical=False)


def test_every_failing_comparison_is_listed():
    comps = [_comparison("a", cosine=0.5), _comparison("b"), _comparison("c", norm_ratio=2.0)]
    r = _report("fp16", comps, flips=_flips(real=1))
    assert r.failures == ["a: cosine 0.50000 < 0.999", "c: |norm ratio - 1| = 1.0000 > 0.01",
                          "real plan flips: 1 of 32 sources (0.031 > 0.0; near ties, allowed: 0)"]


def test_a_mismatched_mask_fails_every_precision_gate():
    bad = Comparison.of("logits", np.array([[1.0, 0.0]]), np.array([[1.0, FP16_MIN]]))
    for precision in ("fp32", "fp16", "int8", "4bit"):
        assert not _report(precision, [bad]), precision


def test_comparison_in_blocks_of_rows_gives_the_whole_array_numbers(monkeypatch):
    """Comparison.of works a block of rows at a time (a photo's prefill logits are GBs in float64): with blocks of
    two rows, the numbers equal the whole-array formulas written out here, masked column included."""
    import scr_export.parity as parity

    monkeypatch.setattr(parity, "_BLOCK", 2 * 6)
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(2, 5, 6))
    cand = ref + rng.normal(scale=0.3, size=ref.shape)
    ref[..., 4], cand[..., 4] = FP16_MIN, FP32_MIN
    cand[1, 2] = ref[1, 2][[1, 0, 2, 3, 4, 5]]  # one row whose argmax moves
    c = Comparison.of("x", cand.astype(np.float32), ref.astype(np.float32))
    r = ref.astype(np.float32).astype(np.float64).reshape(-1, 6)[:, [0, 1, 2, 3, 5]]
    k = cand.astype(np.float32).astype(np.float64).reshape(-1, 6)[:, [0, 1, 2, 3, 5]]
    assert c.max_abs == pytest.approx(np.abs(k - r).max(), rel=1e-15)
    assert c.max_rel == pytest.approx(np.abs(k - r).max() / np.abs(r).max(), rel=1e-15)
    assert c.cosine == pytest.approx(np.sum(k * r) / np.sqrt(np.sum(k * k) * np.sum(r * r)), rel=1e-13)
    assert c.norm_ratio == pytest.approx(np.sqrt(np.sum(k * k) / np.sum(r * r)), rel=1e-13)
    assert c.top1 == pytest.approx(np.mean(k.argmax(-1) == r.argmax(-1)))
    pr, pk = np.exp(r) / np.exp(r).sum(-1, keepdims=True), np.exp(k) / np.exp(k).sum(-1, keepdims=True)
    assert c.kl == pytest.approx(np.mean(np.sum(pr * np.log(pr / pk), -1)), rel=1e-12)
    assert c.top1 < 1.0


def _scored(name, top1=1.0, kl=0.0):
    return Comparison(name, max_abs=0.0, max_rel=0.0, cosine=1.0, norm_ratio=1.0, top1=top1, kl=kl)


@pytest.mark.parametrize("precision, top1_gate, kl_gate", [("int8/float", 0.97, 0.01), ("fp8/float", 0.97, 0.01),
                                                            ("int4/float", 0.90, 0.05)])
def test_top1_and_kl_gates_judge_generated_positions_only(precision, top1_gate, kl_gate):
    """Top-1 agreement and KL are gated on the decode logits (the tokens a user reads) and not on prefill rows
    inside the image; the threshold itself passes, just past it fails with the numbers named."""
    low, high = top1_gate - 0.01, kl_gate * 2
    # prefill rows may disagree as much as they like
    assert _report(precision, [_scored("prefill logits (SCR)", top1=0.0, kl=10.0)])
    assert _report(precision, [_scored("decode logits x16", top1=top1_gate, kl=kl_gate)])
    r = _report(precision, [_scored("decode logits x16", top1=low)])
    assert r.failures == [f"decode logits x16: top-1 agreement {low:.3f} < {top1_gate}"]
    r = _report(precision, [_scored("decode logits x16 (SCR off)", kl=high)])
    assert r.failures == [f"decode logits x16 (SCR off): KL {high:.2e} > {kl_gate}"]
    r = _report(precision, [_scored("prefill logits (SCR)", top1=0.0), _scored("decode logits x4", top1=low, kl=high)])
    assert len(r.failures) == 2 and all(f.startswith("decode logits x4") for f in r.failures)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "4bit"])
def test_top1_and_kl_are_not_gated_where_the_table_has_no_such_gate(precision):
    assert _report(precision, [_scored("decode logits x16", top1=0.0, kl=5.0)])
