"""validate --data: every sample against the reference, aggregates that equal what the per-sample numbers give,
gates on the aggregate, POPE's metrics (against hand-counted confusion matrices) and bad data refused (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxruntime  # noqa: E402,F401  (installed by the README's test command: a failed import fails)

from conftest import make_image  # noqa: E402
from scr_export.dataset_parity import METRICS, PERCENTILE  # noqa: E402
from scr_export.parity import GATES  # noqa: E402
from scr_export.pope import PopeMetrics, read_answer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POPE = ROOT / "examples" / "pope" / "pope.jsonl"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scr_export.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- POPE ------------------------------------------------------------------------------------------------------------

def test_answers_are_read_from_their_first_words():
    assert [read_answer(t) for t in ("Yes, there is a car.", " no.", "No", "There is not a dog.", "yes",
                                     "The car is red.", "", "Nope", "It is not there")] == \
        ["yes", "no", "no", "no", "yes", "other", "other", "no", "no"]


def test_pope_metrics_against_hand_counted_confusion_matrices():
    # labels:  yes yes yes yes no  no  no  no  no  yes
    # answers: yes yes no  oth yes no  no  oth no  yes  -> TP 3, FN 2 (a no, an other), FP 1, TN 3, other 2
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "yes"]
    answers = ["yes", "yes", "no", "other", "yes", "no", "no", "other", "no", "yes"]
    m = PopeMetrics.of(answers, labels)
    assert (m.tp, m.fn, m.fp, m.tn, m.other, m.n) == (3, 2, 1, 3, 2, 10)
    assert m.accuracy == pytest.approx(6 / 10)
    assert m.precision == pytest.approx(3 / 4)
    assert m.recall == pytest.approx(3 / 5)
    assert m.f1 == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert m.yes_ratio == pytest.approx(4 / 10)
    none = PopeMetrics.of(["no", "other"], ["yes", "no"])  # nothing predicted yes: precision and F1 undefined
    assert none.to_dict()["precision"] is None and none.to_dict()["f1"] is None and none.recall == 0.0


# -- the dataset report ------------------------------------------------------------------------------------------------

def _six_sample_jsonl(tmp_path: Path) -> Path:
    lines = []
    for i in range(6):
        make_image(150 + 20 * i, 120 + 10 * (i % 3), seed=40 + i).save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": ["Describe it.", "What is red?"][i % 2]}))
    path = tmp_path / "six.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_report(report: dict, n: int, labelled: bool):
    assert len(report["samples"]) == n and [s["index"] for s in report["samples"]] == list(range(n))
    for name, comp in report["comparisons"].items():
        reports = [s["reports"][name] for s in report["samples"]]
        for key, _, higher, _ in METRICS:
            agg = comp["aggregates"][key]
            values = np.asarray([_metric(key, r) for r in reports])
            assert agg["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-15)
            assert agg["tail"] == pytest.approx(np.percentile(values, PERCENTILE if higher else 100 - PERCENTILE),
                                                rel=1e-12, abs=1e-15)
            assert agg["worst"] == pytest.approx(values.min() if higher else values.max(), rel=1e-12, abs=1e-15)
            assert values[agg["worst_sample"]] == agg["worst"]
        assert comp["near_ties"] == sum(r["flips"]["near_ties"] for r in reports)
        assert comp["real_flips"] == sum(r["flips"]["real_flips"] for r in reports)
        assert comp["gates"] == GATES[comp["precision"]]
    assert (report["pope"] is not None) == labelled
    if labelled:
        labels = [s["label"] for s in report["samples"]]
        for who, key in (("reference", "reference_scr"), ("deployed", "deployed_off")):
            scr = "scr" if key.endswith("scr") else "off"
            want = PopeMetrics.of([s["answers"][who][scr] for s in report["samples"]], labels).to_dict()
            assert report["pope"][key] == want


def _metric(key: str, r: dict) -> float:
    """The per-sample value of ``key``, recomputed from the sample's own JSON (not the code's functions)."""
    comps = r["comparisons"]
    gen = [c for c in comps if c["name"].startswith("decode logits")]
    return {"cosine": min(c["cosine"] for c in comps), "max_rel": max(c["max_rel"] for c in comps),
            "norm_ratio": max(abs(c["norm_ratio"] - 1) for c in comps), "kl": max(c["kl"] for c in gen),
            "top1": min(c["top1"] for c in gen), "plan_jaccard": r["plan_jaccard"],
            "plan_identical": float(r["plan_identical"]), "scr_effect_cosine": r["scr_effect_cosine"],
            "scr_effect_cosine_same_plan": r["scr_effect_cosine_same_plan"],
            "greedy_identical": float(r["greedy_identical"]), "map_error_rel": r["flips"]["map_error_rel"]}[key]


@pytest.mark.parametrize("kind", ["onnx", "gguf"])
def test_validate_over_a_jsonl_and_the_shipped_pope_file(kind, converted, gguf_dir, tmp_path):
    if kind == "gguf":
        import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
        directory = gguf_dir("llava", "q8_0")[0]
    else:
        directory = converted("llava")[0]
    for data, n, labelled in ((_six_sample_jsonl(tmp_path), 6, False), (POPE, 8, True)):
        out = tmp_path / f"{kind}-{n}.json"
        res = run_cli("validate", str(directory), "--data", str(data), "--steps", "4", "--json", str(out))
        assert res.returncode in (0, 1), res.stderr[-3000:]
        report = json.loads(out.read_text())
        _check_report(report, n, labelled)
        assert report["passed"] == (res.returncode == 0)
        lines = out.with_name(out.stem + ".samples.jsonl").read_text().splitlines()
        assert [json.loads(line)["where"] for line in lines] == [s["where"] for s in report["samples"]]
        assert "gates on the aggregate" in res.stdout
        if labelled:
            assert "POPE" in res.stdout and "yes-ratio" in res.stdout
        if kind == "gguf":  # both comparisons, each aggregated
            assert set(report["comparisons"]) == {"dequantized", "float"}
        else:
            assert set(report["comparisons"]) == {"float"} and report["passed"]  # fp32: every gate holds


@pytest.mark.parametrize("content, limit, needle", [
    ('{"image": "nowhere.png", "prompt": "hi"}\n', None, "does not exist"),
    ('{"image": "ok.png", "question": "Is there a car?", "label": "maybe"}\n', None, "is not yes or no"),
    ("", None, "holds no records"),
    ('{"image": "ok.png", "prompt": "hi"}\n', "0", "--limit 0 is not positive"),
])
def test_bad_data_is_refused_with_exit_2_and_one_line(content, limit, needle, converted, tmp_path):
    directory = converted("llava")[0]
    make_image().save(tmp_path / "ok.png")
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    args = ["validate", str(directory), "--data", str(data)] + (["--limit", limit] if limit else [])
    res = run_cli(*args, "--json", str(tmp_path / "r.json"))
    assert res.returncode == 2, res.stderr[-2000:]
    problem = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(problem) == 1 and needle in problem[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "r.json").exists()


def test_per_layer_error_fp32_onnx_and_q4_gguf_with_the_picture(converted, gguf_dir, tmp_path):
    """--per-layer: every layer of an fp32 ONNX decoder within 1e-5 of the reference (cosine), with SCR and
    without; a Q4_0 GGUF's layers finite and further off; --plot draws both panels."""
    from PIL import Image

    fp32 = converted("llava")[0]
    out, png = tmp_path / "fp32.json", tmp_path / "fp32.png"
    res = run_cli("validate", str(fp32), "--data", str(POPE), "--limit", "2", "--steps", "2", "--per-layer",
                  "--plot", str(png), "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["per_layer"]["float"]
    assert [r["layer"] for r in rows] == list(range(len(rows))) and any(r["scr_layer"] for r in rows)
    assert all(r["cosine_scr"] >= 0.99999 and r["cosine_off"] >= 0.99999 for r in rows), rows
    assert "per-layer hidden states against float" in res.stdout
    picture = Image.open(png)
    assert picture.size[0] >= 900 and picture.size[1] >= 700  # two panels

    import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
    q4 = gguf_dir("llava", "q4_0")[0]
    image = tmp_path / "i.png"
    make_image(seed=3).save(image)
    out = tmp_path / "q4.json"
    res = run_cli("validate", str(q4), "--image", str(image), "--steps", "2", "--per-layer", "--json", str(out))
    assert res.returncode in (0, 1), res.stderr[-3000:]
    layers = json.loads(out.read_text())["per_layer"]
    assert set(layers) == {"dequantized", "float"}
    q4_rows = layers["float"]
    values = [r[k] for r in q4_rows for k in ("cosine_scr", "cosine_off", "max_rel_scr", "max_rel_off")]
    assert np.all(np.isfinite(values))
    assert min(r["cosine_scr"] for r in q4_rows) < min(r["cosine_scr"] for r in rows)


def test_plot_needs_something_to_draw_and_a_png_name(converted, tmp_path):
    directory = converted("llava")[0]
    res = run_cli("validate", str(directory), "--plot", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "nothing to draw" in res.stderr
    res = run_cli("validate", str(directory), "--data", str(POPE), "--plot", str(tmp_path / "x.jpg"))
    assert res.returncode == 2 and "not a .png" in res.stderr
    assert not list(tmp_path.iterdir())


def test_a_directory_whose_checkpoint_is_gone_is_a_clear_error(converted, tmp_path):
    import shutil

    directory = tmp_path / "moved"
    shutil.copytree(converted("llava")[0], directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["source"]["model"] = str(tmp_path / "deleted-checkpoint")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    res = run_cli("validate", str(directory), "--data", str(POPE), "--limit", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "deleted-checkpoint" in res.stderr and "neither a preset nor an existing directory" in res.stderr


# -- failing gates: exit 1, the gate and the worst sample named ------------------------------------------------------

def _damaged_copy(directory: Path, tmp_path: Path) -> Path:
    """A converted directory whose decoder weights were changed after conversion (a slice of the weights file
    scaled by 1.02): what a corrupted or wrongly quantized artefact looks like to validate."""
    import shutil

    bad = tmp_path / "damaged"
    shutil.copytree(directory, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    data = bad / manifest["graphs"]["decoder"]["file"]
    weights = data.with_name(data.name + ".data")  # the decoder's external weights file
    view = np.memmap(weights, dtype=np.float32, mode="r+")
    n = view.size
    view[n // 4: n // 2] *= np.float32(1.02)
    view.flush()
    del view
    return bad


def test_a_damaged_directory_fails_validate_with_exit_1_naming_the_gate(converted, tmp_path):
    bad = _damaged_copy(converted("llava")[0], tmp_path)
    image = tmp_path / "i.png"
    make_image(seed=5).save(image)
    out = tmp_path / "one.json"
    res = run_cli("validate", str(bad), "--image", str(image), "--steps", "2", "--json", str(out))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is False and any("max rel. error" in f for f in report["failures"]), report["failures"]
    assert "max rel. error" in res.stdout and "FAIL" in res.stdout


def test_a_damaged_directory_fails_validate_data_naming_the_gate_and_the_worst_sample(converted, tmp_path):
    bad = _damaged_copy(converted("llava")[0], tmp_path)
    out = tmp_path / "data.json"
    res = run_cli("validate", str(bad), "--data", str(POPE), "--limit", "3", "--steps", "2", "--json", str(out))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["passed"] is False
    failures = report["comparisons"]["float"]["failures"]
    rel = [f for f in failures if f.startswith("max rel.")]
    assert rel and "worst: sample" in rel[0], failures
    # the sample named is the one whose number is the worst, read back from the per-sample lines
    samples = [json.loads(line) for line in out.with_name(out.stem + ".samples.jsonl").read_text().splitlines()]
    agg = report["comparisons"]["float"]["aggregates"]["max_rel"]
    worst = agg["worst_sample"]
    assert f"worst: sample {worst} ({samples[worst]['where']})" in rel[0]
    assert rel[0] in res.stdout


def _sample_report(precision, cosine=1.0, top1=1.0, greedy=True, real=0):
    from scr_export.parity import Comparison, ParityReport

    comps = [Comparison("prefill logits (SCR)", 0.0, 0.0, cosine, 1.0, 1.0, 0.0),
             Comparison("decode logits x4", 0.0, 0.0, 1.0, 1.0, top1, 0.0)]
    flips = {"sources": 32, "near_ties": 0, "real_flips": real, "real_flip_fraction": real / 32, "map_error": 0.0,
             "map_error_rel": 0.0, "flips": []}
    return ParityReport(precision=precision, provider="test", comparisons=comps, plan_identical=True,
                        plan_jaccard=1.0, scr_effect_cosine=1.0, greedy_identical=greedy, ref_tokens=[[1]],
                        cand_tokens=[[1]], scr_effect_cosine_same_plan=1.0, flips=flips)


def test_aggregates_fail_on_the_tail_and_name_the_worst_sample():
    """Twenty samples, written out by hand: the 5th percentile (numpy's linear rule) of cosines with two bad values,
    the gate failing on it, and the worst sample named with its place in the data."""
    from scr_export.dataset_parity import summarise

    cos = [1.0] * 18 + [0.985, 0.95]  # sorted: the 5th percentile lies at rank 0.95 between 0.95 and 0.985
    reports = [_sample_report("int8", cosine=c) for c in cos[::-1]]  # the worst first: sample 0
    where = [f"img{i}.png" for i in range(20)]
    s = summarise("float", reports, where)
    a = s.aggregates["cosine"]
    assert a.worst == 0.95 and a.worst_sample == 0
    assert a.tail == pytest.approx(0.95 + 0.95 * (0.985 - 0.95))
    assert a.mean == pytest.approx((18 + 0.985 + 0.95) / 20)
    assert s.failures == [f"logits cosine (min): 5th percentile {a.tail:.5g} < 0.99 (worst: sample 0 (img0.png) "
                          f"at 0.95)"], s.failures
    assert not s
    # one bad sample in twenty sits beyond the 5th percentile's reach: the tail gate holds
    ok = summarise("float", [_sample_report("int8", cosine=c) for c in [1.0] * 19 + [0.95]], where)
    assert ok.aggregates["cosine"].tail >= 0.99 and not any("cosine" in f for f in ok.failures)


def test_identity_gates_count_the_samples_that_differ_and_flips_add_up():
    from scr_export.dataset_parity import summarise

    where = [f"s{i}" for i in range(5)]
    reports = [_sample_report("fp32", greedy=g) for g in (True, False, True, False, True)]
    s = summarise("float", reports, where)
    assert any(f.startswith("greedy tokens identical: 2 of 5 samples differ (worst: sample 1 (s1)") for f in
               s.failures), s.failures
    flips = summarise("float", [_sample_report("int8", real=r) for r in (0, 3, 0, 2, 0)], where)
    assert (flips.real_flips, flips.sources) == (5, 160)
    assert flips.failures == []  # 5 / 160 = 0.031 <= 0.05
    worse = summarise("float", [_sample_report("int8", real=r) for r in (4, 3, 2, 2, 0)], where)
    assert worse.failures == ["real plan flips: 11 of 160 sources (0.069 > 0.05)"]
