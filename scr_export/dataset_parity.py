"""Validation over a dataset: every sample teacher-forced against the PyTorch reference (``parity.compare_inputs``),
the per-sample numbers aggregated (mean, 5th percentile, worst and which sample), the precision's gates applied to
the aggregate, and POPE's metrics for labelled (yes/no) data.

The gates are the per-precision gates of ``parity.GATES``, each judged on the aggregate: a bound on a quantity that
should be high (cosine, top-1, SCR effect) applies to its 5th percentile over the samples, a bound on an error (max
rel., KL, |norm ratio − 1|, map error) to its 95th percentile, "identical" flags to every sample, and real plan
flips to their count over all sources. One unlucky sample does not fail a deployment; a tail of them does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .parity import GATES, ParityReport, compare_inputs, layer_parity, open_for_validation
from .pope import PopeMetrics, read_answer

PERCENTILE = 5  # the tail the aggregate gates judge: the 5th percentile (95th for errors)


def _generated(r: ParityReport):
    return [c for c in r.comparisons if c.name.startswith("decode logits")] or r.comparisons


# (key, label, higher is better, value of one sample's report)
METRICS: list[tuple[str, str, bool, Callable[[ParityReport], float]]] = [
    ("cosine", "logits cosine (min)", True, lambda r: min(c.cosine for c in r.comparisons)),
    ("max_rel", "max rel. error", False, lambda r: max(c.max_rel for c in r.comparisons)),
    ("norm_ratio", "|norm ratio - 1|", False, lambda r: max(abs(c.norm_ratio - 1) for c in r.comparisons)),
    ("kl", "KL (generated)", False, lambda r: max(c.kl for c in _generated(r))),
    ("top1", "top-1 (generated)", True, lambda r: min(c.top1 for c in _generated(r))),
    ("plan_jaccard", "source Jaccard", True, lambda r: r.plan_jaccard),
    ("plan_identical", "plan identical", True, lambda r: float(r.plan_identical)),
    ("scr_effect_cosine", "SCR effect (end-to-end)", True, lambda r: r.scr_effect_cosine),
    ("scr_effect_cosine_same_plan", "SCR effect (ref. plan)", True,
     lambda r: r.scr_effect_cosine_same_plan if r.scr_effect_cosine_same_plan is not None else r.scr_effect_cosine),
    ("greedy_identical", "greedy tokens identical", True, lambda r: float(r.greedy_identical)),
    ("map_error_rel", "map error (relative)", False, lambda r: r.flips["map_error_rel"] if r.flips else 0.0),
]


@dataclasses.dataclass
class Aggregate:
    key: str
    label: str
    higher_is_better: bool
    mean: float
    tail: float          # the 5th percentile (higher is better) or the 95th (an error)
    worst: float
    worst_sample: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def aggregate(values: list[float], key: str, label: str, higher: bool) -> Aggregate:
    v = np.asarray(values, np.float64)
    worst = int(np.argmin(v) if higher else np.argmax(v))
    tail = float(np.percentile(v, PERCENTILE if higher else 100 - PERCENTILE))
    return Aggregate(key, label, higher, float(v.mean()), tail, float(v[worst]), worst)


@dataclasses.dataclass
class ComparisonSummary:
    """One comparison (e.g. against the float model) over every sample."""

    name: str
    precision: str
    aggregates: dict[str, Aggregate]
    near_ties: int
    real_flips: int
    sources: int
    failures: list[str]

    def __bool__(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "gates": GATES[self.precision],
                "aggregates": {k: a.to_dict() for k, a in self.aggregates.items()}, "near_ties": self.near_ties,
                "real_flips": self.real_flips, "sources": self.sources, "passed": bool(self),
                "failures": self.failures}


def summarise(name: str, reports: list[ParityReport], where: list[str]) -> ComparisonSummary:
    precision = reports[0].precision
    aggs = {key: aggregate([fn(r) for r in reports], key, label, higher) for key, label, higher, fn in METRICS}
    near = sum(r.flips["near_ties"] for r in reports if r.flips)
    real = sum(r.flips["real_flips"] for r in reports if r.flips)
    sources = sum(r.flips["sources"] for r in reports if r.flips)
    return ComparisonSummary(name, precision, aggs, near, real, sources,
                             _check(GATES[precision], aggs, real, sources, where))


def _check(gate: dict, aggs: dict[str, Aggregate], real: int, sources: int, where: list[str]) -> list[str]:
    fails = []

    def worst(a: Aggregate) -> str:
        return f"worst: sample {a.worst_sample} ({where[a.worst_sample]}) at {a.worst:.5g}"

    for key, bound in gate.items():
        if key in ("plan_identical", "greedy_identical"):
            a = aggs[key]
            if bound and a.worst < 1:
                n = round((1 - a.mean) * len(where))
                fails.append(f"{a.label}: {n} of {len(where)} samples differ ({worst(a)})")
        elif key == "real_flip_fraction":
            frac = real / sources if sources else 0.0
            if not frac <= bound:
                fails.append(f"real plan flips: {real} of {sources} sources ({frac:.3f} > {bound})")
        elif key in aggs:
            a = aggs[key]
            if a.higher_is_better and not a.tail >= bound:
                fails.append(f"{a.label}: 5th percentile {a.tail:.5g} < {bound} ({worst(a)})")
            if not a.higher_is_better and not a.tail <= bound:
                fails.append(f"{a.label}: 95th percentile {a.tail:.3g} > {bound} ({worst(a)})")
    return fails


@dataclasses.dataclass
class DatasetReport:
    directory: str
    provider: str
    samples: list[dict[str, Any]]
    comparisons: dict[str, ComparisonSummary]
    pope: dict[str, Any] | None
    per_layer: dict[str, list[dict[str, Any]]] | None = None  # parity.layer_parity on the first sample

    def __bool__(self) -> bool:
        return all(bool(c) for c in self.comparisons.values())

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "provider": self.provider, "passed": bool(self),
                "percentile": PERCENTILE, "samples": self.samples,
                "comparisons": {k: c.to_dict() for k, c in self.comparisons.items()}, "pope": self.pope,
                "per_layer": self.per_layer}

    def table(self) -> str:
        out = []
        for name, c in self.comparisons.items():
            out.append(f"== {name} ({c.precision}), {len(self.samples)} samples")
            head = f"{'metric':<26}{'mean':>11}{'p5 / p95':>11}{'worst':>11}  worst sample"
            out += [head, "-" * (len(head) + 14)]
            for a in c.aggregates.values():
                out.append(f"{a.label:<26}{a.mean:>11.5g}{a.tail:>11.5g}{a.worst:>11.5g}  "
                           f"{a.worst_sample}: {self.samples[a.worst_sample]['where']}")
            out.append(f"plan flips: {c.near_ties} near ties, {c.real_flips} real of {c.sources} sources")
            out.append(f"{c.precision} gates on the aggregate: " + ("PASS" if c else "FAIL\n  " + "\n  ".join(c.failures)))
            out.append("")
        if self.pope:
            out.append(pope_table(self.pope))
        return "\n".join(out).rstrip()


def pope_report(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """POPE's metrics for the reference and the deployed model, with SCR and without; their agreement; the samples
    where SCR changed one model's answer but not the other's."""
    labels = [s["label"] for s in samples]
    out: dict[str, Any] = {}
    for who in ("reference", "deployed"):
        for scr in ("scr", "off"):
            out[f"{who}_{scr}"] = PopeMetrics.of([s["answers"][who][scr] for s in samples], labels).to_dict()
    for scr in ("scr", "off"):
        same = [s["answers"]["reference"][scr] == s["answers"]["deployed"][scr] for s in samples]
        out[f"agreement_{scr}"] = float(np.mean(same))
    out["scr_changed_one_only"] = [
        i for i, s in enumerate(samples)
        if (s["answers"]["reference"]["scr"] != s["answers"]["reference"]["off"])
        != (s["answers"]["deployed"]["scr"] != s["answers"]["deployed"]["off"])]
    return out


def pope_table(p: dict[str, Any]) -> str:
    head = f"{'POPE':<20}{'accuracy':>10}{'precision':>11}{'recall':>8}{'F1':>8}{'yes-ratio':>11}{'other':>7}"
    rows = [head, "-" * len(head)]
    for key, label in (("reference_scr", "reference, SCR"), ("reference_off", "reference, no SCR"),
                       ("deployed_scr", "deployed, SCR"), ("deployed_off", "deployed, no SCR")):
        m = {k: ("n/a" if v is None else f"{v:.3f}") if isinstance(v, float) or v is None else v
             for k, v in p[key].items()}
        rows.append(f"{label:<20}{m['accuracy']:>10}{m['precision']:>11}{m['recall']:>8}{m['f1']:>8}"
                    f"{m['yes_ratio']:>11}{m['other']:>7}")
    rows.append(f"deployed answers = reference's: {p['agreement_scr']:.3f} with SCR, {p['agreement_off']:.3f} without; "
                f"SCR changed one model's answer but not the other's on samples {p['scr_changed_one_only'] or 'none'}")
    return "\n".join(rows)


def _answers(report: ParityReport) -> dict[str, dict[str, str]]:
    t = report.texts or {}
    return {"reference": {"scr": read_answer(t["reference"][0]), "off": read_answer(t["reference_off"][0])},
            "deployed": {"scr": read_answer(t["candidate"][0]), "off": read_answer(t["candidate_off"][0])}}


def validate_dataset(directory: str | Path, data: str | Path, *, limit: int | None = None, steps: int = 16,
                     family: Any = None, device: str = "auto", runtime: str = "auto", attention: str = "auto",
                     image_root: str | Path | None = None, progress: bool = True,
                     per_layer: bool = False) -> DatasetReport:
    """Every record of ``data`` (``scr_export.datasets``: a folder, JSONL, or POPE-format JSONL) against the
    reference; the data is checked completely before the model is loaded."""
    from .datasets import list_records, open_image

    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit} is not positive", "use at least 1, or leave --limit out for every sample")
    records = list_records(data, image_root=image_root)
    if limit is not None:
        records = records[:limit]
    labelled = records[0].label is not None
    runner, family = open_for_validation(directory, family=family, device=device, runtime=runtime,
                                         attention=attention)
    from tqdm.auto import tqdm

    per: dict[str, list[ParityReport]] = {}
    samples: list[dict[str, Any]] = []
    layers = None
    for i, rec in enumerate(tqdm(records, desc="validating", unit="sample", disable=not progress)):
        inputs = runner.encode([[open_image(rec.image, rec.where)]], [rec.prompt])
        if per_layer and i == 0:
            layers = layer_parity(runner, family, inputs)
        result = compare_inputs(runner, family, inputs, steps, answer_tokens=steps if labelled else 1)
        reports = result if isinstance(result, dict) else {"float": result}
        sample: dict[str, Any] = {"index": i, "where": rec.where, "image": str(rec.image), "prompt": rec.prompt,
                                  "label": rec.label, "reports": {k: r.to_dict() for k, r in reports.items()}}
        if labelled:
            sample["answers"] = _answers(reports["float"])
        samples.append(sample)
        for k, r in reports.items():
            per.setdefault(k, []).append(r)
    where = [s["where"] for s in samples]
    comparisons = {k: summarise(k, rs, where) for k, rs in per.items()}
    return DatasetReport(str(directory), runner.provider, samples, comparisons,
                         pope_report(samples) if labelled else None, layers)


def write_dataset_report(report: DatasetReport, path: str | Path) -> Path:
    """The JSON report at ``path`` and the per-sample records as JSONL beside it (``<stem>.samples.jsonl``), each
    written atomically. Returns the JSONL's path."""
    path = Path(path)
    lines = path.with_name(path.stem + ".samples.jsonl")
    for target, text in ((path, json.dumps(report.to_dict(), indent=2)),
                         (lines, "".join(json.dumps(s) + "\n" for s in report.samples))):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return lines
