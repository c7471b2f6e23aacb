"""Parity: a deployed runtime against the PyTorch reference, teacher-forced, with the gates of DESIGN.md."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SCRExportError

# DESIGN.md's gates by precision (starting points; tighten with evidence)
# Plan flips are judged by their margin (scr_export.plan_flips): near ties (the reference's credits of the two
# patches within twice the candidate's typical map error) are the diagnostic's noise and pass; "real_flip_fraction"
# bounds the others, "map_error_rel" the diagnostic map's error (max |ΔA| / max A). The SCR effect is gated with the
# reference's plan (the engine's error); the end-to-end effect, which a near tie moves, is reported.
# Evidence (validate --data on examples/pope, 8 samples, the four tiny presets): real flips 0 of 32 sources in
# every engine comparison (Q8_0, Q4_0 against their dequantized weights; 1 of 32 at Q4_0 against the float model,
# reported); map error 95th percentile: fp32 ONNX / f32 GGUF <= 1.3e-7 (1.5e-5 with llama.cpp's Qwen2-VL epsilon-0
# deviation), Q8_0 <= 3.5e-3, Q4_0 <= 4.3e-2.
GATES = {
    "fp32": {"max_rel": 1e-4, "plan_identical": True, "greedy_identical": True, "real_flip_fraction": 0.0,
             "map_error_rel": 1e-4},
    "fp16": {"cosine": 0.999, "norm_ratio": 0.01, "real_flip_fraction": 0.0},
    "int8": {"cosine": 0.99, "norm_ratio": 0.05, "scr_effect_cosine_same_plan": 0.95, "real_flip_fraction": 0.05,
             "map_error_rel": 1e-2},
    "4bit": {"cosine": 0.97, "norm_ratio": 0.1, "scr_effect_cosine_same_plan": 0.9, "real_flip_fraction": 0.1,
             "map_error_rel": 0.1},
    # quantized ONNX / TensorRT graphs against the float32 PyTorch model (what users see): research/quantization.md
    # §3.2's starting points; the SCR effect is judged with the reference's plan (flips of near-tied sources are
    # the diagnostic's noise, reported beside it)
    # (map error and real flips measured over examples/pope: int8 <= 9.3e-3, fp8 <= 1.2e-3, no real flip)
    "int8/float": {"cosine": 0.995, "norm_ratio": 0.05, "top1": 0.97, "kl": 0.01, "scr_effect_cosine_same_plan": 0.95,
                   "real_flip_fraction": 0.05, "map_error_rel": 2e-2},
    "fp8/float": {"cosine": 0.995, "norm_ratio": 0.05, "top1": 0.97, "kl": 0.01, "scr_effect_cosine_same_plan": 0.95,
                  "real_flip_fraction": 0.05, "map_error_rel": 2e-2},
    "int4/float": {"cosine": 0.98, "norm_ratio": 0.1, "top1": 0.90, "kl": 0.05, "scr_effect_cosine_same_plan": 0.95,
                   "real_flip_fraction": 0.1, "map_error_rel": 0.1},
    # the same graph with ONNX Runtime's quantized kernels against it run unfused (kernel error alone). Measured:
    # cosine >= 0.99978 everywhere (small-llava int8: a fused fp32 norm flips activations that sit on an int8
    # rounding boundary by one step, which also moves the small SCR effect: 0.89, reported, not gated)
    # (fused vs unfused: map error <= 3e-6, no flip at all over examples/pope)
    "int8/engine": {"cosine": 0.999, "norm_ratio": 0.01, "real_flip_fraction": 0.0},
    "fp8/engine": {"cosine": 0.999, "norm_ratio": 0.01, "real_flip_fraction": 0.0},
    "int4/engine": {"cosine": 0.999, "norm_ratio": 0.01, "real_flip_fraction": 0.0},
    "report": {},  # numbers only (a quantized model against the float model: random tiny models exaggerate it)
}
_MASKED = -65504.0  # Chameleon masks image-token logits with finfo(dtype).min: -3.4e38 (fp32), -65504 (fp16)


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


@dataclasses.dataclass
class Comparison:
    """Candidate vs reference on one output."""

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    norm_ratio: float
    top1: float
    kl: float

    @classmethod
    def of(cls, name: str, cand: np.ndarray, ref: np.ndarray) -> "Comparison":
        """The numbers of ``cand`` against ``ref`` ([..., V] logits or any array), in float64, a block of rows at
        a time: a photo's prefill is 512 compared positions x 151936 logits, and whole-array float64 temporaries
        (differences, masks, two log-softmaxes) held 6 GB at once (measured, benchmarks/photo_memory.py)."""
        cand, ref = np.asarray(cand), np.asarray(ref)
        if cand.shape != ref.shape:
            raise SCRExportError(f"{name}: candidate shape {cand.shape} != reference {ref.shape}",
                                 "the deployed graph does not match the reference model")
        width = ref.shape[-1] if ref.ndim else 1
        c2, r2 = cand.reshape(-1, width), ref.reshape(-1, width)
        step = max(1, _BLOCK // max(width, 1))
        blocks = [slice(i, i + step) for i in range(0, r2.shape[0], step)]
        masked_cols = np.zeros(width, bool)
        for blk in blocks:  # masked entries (Chameleon's image-token logits) must agree exactly
            m = r2[blk] <= _MASKED
            if not np.array_equal(m, c2[blk] <= _MASKED):
                return cls(name, float("inf"), float("inf"), 0.0, 0.0, 0.0, float("inf"))
            masked_cols |= m.any(0)
        max_abs = max_ref = dot = cc = rr = kl = 0.0
        hits = 0
        for blk in blocks:
            r, c = r2[blk].astype(np.float64), c2[blk].astype(np.float64)
            m = r <= _MASKED
            top_c = np.argmax(np.where(m, -np.inf, c), -1)
            top_r = np.argmax(np.where(m, -np.inf, r), -1)
            hits += int(np.sum(top_c == top_r))
            if m.any():
                r, c = np.where(m, 0, r), np.where(m, 0, c)
            max_abs = max(max_abs, float(np.abs(c - r).max()))
            max_ref = max(max_ref, float(np.abs(r).max()))
            dot += float(np.sum(c * r))
            cc += float(np.sum(c * c))
            rr += float(np.sum(r * r))
            if not masked_cols.all():
                kl += _kl(r, c, np.broadcast_to(masked_cols, r.shape)) * r.shape[0]
        rows = max(r2.shape[0], 1)
        norm_c, norm_r = np.sqrt(cc), np.sqrt(rr)
        return cls(name, max_abs, max_abs / max(max_ref, 1e-300), float(dot / max(norm_c * norm_r, 1e-300)),
                   float(norm_c / max(norm_r, 1e-300)), hits / rows, kl / rows)


_BLOCK = 1 << 22  # elements per block of rows in Comparison.of (32 MB in float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl(ref: np.ndarray, cand: np.ndarray, masked: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(cand)) over positions, masked vocabulary entries left out."""
    keep = ~masked.reshape(-1, masked.shape[-1]).any(0)
    r = ref.reshape(-1, ref.shape[-1])[:, keep]
    c = cand.reshape(-1, cand.shape[-1])[:, keep]
    lr, lc = _log_softmax(r), _log_softmax(c)
    return float(np.mean(np.sum(np.exp(lr) * (lr - lc), -1)))


@dataclasses.dataclass
class ParityReport:
    """Truthy when every gate of its precision passes; carries all the numbers."""

    precision: str
    provider: str
    comparisons: list[Comparison]
    plan_identical: bool
    plan_jaccard: float
    scr_effect_cosine: float
    greedy_identical: bool
    ref_tokens: list[list[int]]
    cand_tokens: list[list[int]]
    # the SCR effect with the candidate run on the reference's plan: the engine's error alone, without the plan
    # flips that near-tied attention credits cause (reported, not gated; equals scr_effect_cosine when plans agree)
    scr_effect_cosine_same_plan: float | None = None
    flips: dict | None = None  # scr_export.plan_flips.FlipJudgement.to_dict(): near ties, real flips, map error
    texts: dict | None = None  # greedy answers per row: reference / candidate, with SCR and without ("_off")
    failures: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.failures = self._check()

    def _check(self) -> list[str]:
        gate = GATES[self.precision]
        fails = []
        for c in self.comparisons:
            if "max_rel" in gate and not c.max_rel <= gate["max_rel"]:
                fails.append(f"{c.name}: max rel. error {c.max_rel:.2e} > {gate['max_rel']:.0e}")
            if "cosine" in gate and not c.cosine >= gate["cosine"]:
                fails.append(f"{c.name}: cosine {c.cosine:.5f} < {gate['cosine']}")
            if "norm_ratio" in gate and not abs(c.norm_ratio - 1) <= gate["norm_ratio"]:
                fails.append(f"{c.name}: |norm ratio - 1| = {abs(c.norm_ratio - 1):.4f} > {gate['norm_ratio']}")
            # top-1 and KL are judged where tokens are generated (the last prompt position and the teacher-forced
            # decode steps): a prefill row inside the image predicts nothing anyone reads
            generated = c.name.startswith("decode logits")
            if generated and "top1" in gate and not c.top1 >= gate["top1"]:
                fails.append(f"{c.name}: top-1 agreement {c.top1:.3f} < {gate['top1']}")
            if generated and "kl" in gate and not c.kl <= gate["kl"]:
                fails.append(f"{c.name}: KL {c.kl:.2e} > {gate['kl']}")
        if gate.get("plan_identical") and not self.plan_identical:
            fails.append("the plan differs from the reference's (sources or donors)")
        if "plan_jaccard" in gate and not self.plan_jaccard >= gate["plan_jaccard"]:
            fails.append(f"plan Jaccard {self.plan_jaccard:.3f} < {gate['plan_jaccard']}")
        if gate.get("greedy_identical") and not self.greedy_identical:
            fails.append("greedy tokens differ from the reference's")
        if "scr_effect_cosine" in gate and not self.scr_effect_cosine >= gate["scr_effect_cosine"]:
            fails.append(f"SCR effect cosine {self.scr_effect_cosine:.4f} < {gate['scr_effect_cosine']}")
        fl = self.flips
        if "real_flip_fraction" in gate and fl is not None and not fl["real_flip_fraction"] <= gate["real_flip_fraction"]:
            fails.append(f"real plan flips: {fl['real_flips']} of {fl['sources']} sources "
                         f"({fl['real_flip_fraction']:.3f} > {gate['real_flip_fraction']}; near ties, allowed: "
                         f"{fl['near_ties']})")
        if "map_error_rel" in gate and fl is not None and not fl["map_error_rel"] <= gate["map_error_rel"]:
            fails.append(f"diagnostic map error {fl['map_error_rel']:.2e} (relative) > {gate['map_error_rel']:.0e}")
        same = self.scr_effect_cosine_same_plan
        if "scr_effect_cosine_same_plan" in gate and not (same is not None and same >= gate["scr_effect_cosine_same_plan"]):
            shown = "not measured" if same is None else f"{same:.4f}"
            fails.append(f"SCR effect cosine with the reference's plan {shown} < {gate['scr_effect_cosine_same_plan']}")
        return fails

    def __bool__(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = bool(self)
        d["gates"] = GATES[self.precision]
        return d

    def table(self) -> str:
        head = f"{'output':<22} {'max|Δ|':>10} {'max rel':>10} {'cosine':>10} {'norm ratio':>11} {'top-1':>7} {'KL':>10}"
        rows = [head, "-" * len(head)]
        for c in self.comparisons:
            rows.append(f"{c.name:<22} {c.max_abs:>10.3e} {c.max_rel:>10.3e} {c.cosine:>10.6f} {c.norm_ratio:>11.6f} "
                        f"{c.top1:>7.3f} {c.kl:>10.3e}")
        rows.append(f"plan: identical={self.plan_identical}  source Jaccard={self.plan_jaccard:.3f}   "
                    f"SCR effect cosine={self.scr_effect_cosine:.6f}   greedy tokens identical={self.greedy_identical}")
        if not self.plan_identical and self.scr_effect_cosine_same_plan is not None:
            rows.append(f"SCR effect cosine with the reference's plan (the engine's error without plan flips)="
                        f"{self.scr_effect_cosine_same_plan:.6f}")
        if self.flips is not None:
            fl = self.flips
            rows.append(f"plan flips: {fl['near_ties']} near ties, {fl['real_flips']} real of {fl['sources']} sources; "
                        f"diagnostic map error max|ΔA| {fl['map_error']:.2e} ({fl['map_error_rel']:.2e} relative)")
        rows.append(f"precision {self.precision}, provider {self.provider}: "
                    + ("PASS" if self else "FAIL\n  " + "\n  ".join(self.failures)))
        return "\n".join(rows)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays (masked entries as 0), in float64, ``_BLOCK`` elements at a time."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    dot = aa = bb = 0.0
    for i in range(0, a.size, _BLOCK):
        x, y = _flat(a[i:i + _BLOCK]), _flat(b[i:i + _BLOCK])
        x, y = np.where(x <= _MASKED, 0, x), np.where(y <= _MASKED, 0, y)
        dot, aa, bb = dot + float(np.dot(x, y)), aa + float(np.dot(x, x)), bb + float(np.dot(y, y))
    return float(dot / max(np.sqrt(aa) * np.sqrt(bb), 1e-300))


def _jaccard(a, b) -> float:
    sa, sb = set(map(int, a)), set(map(int, b))
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


def default_inputs():
    from .sample import sample_image

    return [[sample_image()]], ["What is in this picture? Describe the main object."]


@dataclasses.dataclass
class ReferenceRuns:
    """What a reference computed for one input (with SCR, teacher-forcing tokens and plan; without SCR): all the
    candidate's comparison needs, so the reference can be freed before the candidate runs."""
    on: Any
    off: Any


def reference_runs(reference: Any, inputs: Any, cfg: Any, steps: int, answer_tokens: int = 1) -> ReferenceRuns:
    """Run ``reference`` (a ``TorchReference``, a family, or another runner) on ``inputs``: greedy with SCR for
    ``steps`` tokens, and without SCR for ``answer_tokens``."""
    if not hasattr(reference, "generate"):
        from .reference import TorchReference

        reference = TorchReference(reference)
    on = _bounded(reference.generate(inputs, config=cfg, max_new_tokens=steps, stop_at_eos=False,
                                     keep_prefill_logits=True))
    off = _bounded(reference.generate(inputs, config=cfg, scr=False, max_new_tokens=max(1, answer_tokens),
                                      stop_at_eos=False, keep_prefill_logits=True))
    return ReferenceRuns(on, off)


PREFILL_POSITIONS = 512  # prefill logits compared at most at this many positions per prompt


def compared_positions(length: int, cap: int = PREFILL_POSITIONS) -> np.ndarray:
    """The prefill positions whose logits are compared: all of them up to ``cap``; beyond, the last ``cap / 2``
    (the prompt's text and the answer's start) and ``cap / 2`` evenly spread over the rest (the image tokens). A
    photo at Qwen2-VL's limits is ~1600 positions x 151936 logits: 1 GB a run in float32, and parity holds six
    runs and their float64 differences, so the whole prefill would not fit where the model does."""
    if length <= cap:
        return np.arange(length)
    head = np.linspace(0, length - cap // 2 - 1, cap - cap // 2).round().astype(np.int64)
    return np.unique(np.concatenate([head, np.arange(length - cap // 2, length)]))


def _bounded(result: Any) -> Any:
    """``result`` with its prefill logits kept at ``compared_positions`` only (the full array is freed)."""
    logits = getattr(result, "prefill_logits", None)
    if logits is not None and logits.shape[1] > PREFILL_POSITIONS:
        result.prefill_logits = np.ascontiguousarray(logits[:, compared_positions(logits.shape[1])])
    return result


def _compare_runs(runner: Any, reference: Any, inputs: Any, cfg: Any, steps: int, precision: str,
                  answer_tokens: int = 1) -> ParityReport:
    """One candidate runtime against a reference (a ``TorchReference`` or another runner), teacher-forced on the
    reference's own greedy tokens. ``answer_tokens``: how many tokens the runs without SCR generate freely (their
    answers, for POPE; the runs with SCR generate ``steps``)."""
    return judge(runner, reference_runs(reference, inputs, cfg, steps, answer_tokens), inputs, cfg, steps, precision,
                 answer_tokens)


def judge(runner: Any, ref: ReferenceRuns, inputs: Any, cfg: Any, steps: int, precision: str,
          answer_tokens: int = 1) -> ParityReport:
    """The candidate ``runner`` against a reference's recorded runs, with the gate of ``precision``."""
    ref_on, ref_off = ref.on, ref.off
    forced = ref_on.tokens.tolist()
    cand_on = _bounded(runner.generate(inputs, config=cfg, forced_tokens=forced, keep_prefill_logits=True))
    cand_free = runner.generate(inputs, config=cfg, max_new_tokens=steps, stop_at_eos=False)
    off_tokens = max(1, answer_tokens)
    cand_off = _bounded(runner.generate(inputs, config=cfg, scr=False, max_new_tokens=off_tokens, stop_at_eos=False,
                                        keep_prefill_logits=True))
    comparisons = [Comparison.of("prefill logits (SCR)", cand_on.prefill_logits, ref_on.prefill_logits),
                   Comparison.of(f"decode logits x{steps}", np.stack(cand_on.logits), np.stack(ref_on.logits)),
                   Comparison.of("prefill logits (no SCR)", cand_off.prefill_logits, ref_off.prefill_logits)]
    ref_plan, cand_plan = ref_on.plan, cand_on.plan
    identical = (np.array_equal(ref_plan.donor, cand_plan.donor) and np.array_equal(ref_plan.scale, cand_plan.scale)
                 and np.array_equal(ref_plan.weight, cand_plan.weight))
    jac = [_jaccard(a.sources, b.sources) for a, b in zip(ref_plan.images, cand_plan.images)]
    ref_effect = ref_on.prefill_logits - ref_off.prefill_logits
    effect = _cos(cand_on.prefill_logits - cand_off.prefill_logits, ref_effect)
    same_plan = effect
    if not identical:
        cand_ref_plan = _bounded(runner.generate(inputs, config=cfg, plan=ref_plan, max_new_tokens=1,
                                                 stop_at_eos=False, keep_prefill_logits=True))
        same_plan = _cos(cand_ref_plan.prefill_logits - cand_off.prefill_logits, ref_effect)
    from .plan_flips import judge_flips

    judged = judge_flips(ref_plan, cand_plan)
    return ParityReport(precision=precision, provider=runner.provider, comparisons=comparisons,
                        plan_identical=bool(identical), plan_jaccard=float(min(jac) if jac else 1.0),
                        scr_effect_cosine=effect, greedy_identical=bool(np.array_equal(cand_free.tokens, ref_on.tokens)),
                        ref_tokens=ref_on.tokens.tolist(), cand_tokens=cand_free.tokens.tolist(),
                        scr_effect_cosine_same_plan=same_plan, flips=judged.to_dict() if judged else None,
                        texts={"reference": ref_on.texts, "reference_off": ref_off.texts, "candidate": cand_free.texts,
                               "candidate_off": cand_off.texts})


def open_for_validation(directory: str | Path, *, family: Any = None, device: str = "auto", runtime: str = "auto",
                        attention: str = "auto", reference_device: str = "cpu", reference_dtype: str = "float32"):
    """(runner, reference family) for ``directory``: the runtime through the registry, the manifest's checkpoint
    (its hash checked) as the PyTorch reference (float32 on the CPU unless asked)."""
    from runtimes.registry import open_runtime

    from .manifest import read_manifest

    manifest = read_manifest(directory)
    runner = open_runtime(directory, runtime, device=device, attention=attention)
    if family is None:
        family = load_reference(manifest, device=reference_device, dtype=reference_dtype)
    return runner, family


def references(runner: Any, family: Any, inputs: Any) -> dict[str, tuple[Any, str]]:
    """{name: (reference, gate)}: the runner's engine reference where it has one (``engine_reference``), then the
    float32 PyTorch model (``float_gate``)."""
    from .reference import TorchReference

    engine = runner.engine_reference(family, inputs)
    out = {engine[0]: (engine[1], engine[2])} if engine is not None else {}
    dtype = str(getattr(family.model, "dtype", "torch.float32")).replace("torch.", "")
    out["float"] = (TorchReference(family), reference_gate(runner.float_gate(), dtype))
    return out


def compare_inputs(runner: Any, family: Any, inputs: Any, steps: int, answer_tokens: int = 1):
    """The runner against each of its references: one report (the float model alone), or ``{engine name: ...,
    "float": ...}``. Every reference runs before the candidate does."""
    runs = {name: (reference_runs(ref, inputs, runner.config, steps, answer_tokens), gate)
            for name, (ref, gate) in references(runner, family, inputs).items()}
    reports = {name: judge(runner, ref, inputs, runner.config, steps, gate, answer_tokens)
               for name, (ref, gate) in runs.items()}
    return reports["float"] if len(reports) == 1 else reports


def layer_parity(runner: Any, family: Any, inputs: Any) -> dict[str, list[dict[str, Any]]]:
    """Per decoder layer, the deployed hidden state against each reference's, with SCR (everyone on the float
    reference's plan, so plan flips do not blur the engine's error) and without: cosine and max rel. error over the
    prompt's real tokens (batch row 0). ``{reference name: [{layer, cosine_scr, cosine_off, max_rel_scr,
    max_rel_off, scr_layer}]}``."""
    from .reference import plan_for_inputs

    cfg = runner.config
    plan = plan_for_inputs(family, inputs, cfg)
    real = inputs.array("attention_mask")[0].astype(bool)
    cand = {scr: runner.layer_states(inputs, scr=scr, plan=plan if scr else None, config=cfg)[:, real]
            for scr in (True, False)}
    scr_layers = set(cfg.layer_indices())
    out: dict[str, list[dict[str, Any]]] = {}
    for name, (ref, _) in references(runner, family, inputs).items():
        want = {scr: ref.layer_states(inputs, scr=scr, plan=plan if scr else None, config=cfg)[:, real]
                for scr in (True, False)}
        rows = []
        for i in range(cand[True].shape[0]):
            row: dict[str, Any] = {"layer": i, "scr_layer": i in scr_layers}
            for scr, tag in ((True, "scr"), (False, "off")):
                c = Comparison.of(f"layer {i}", cand[scr][i], want[scr][i])
                row[f"cosine_{tag}"], row[f"max_rel_{tag}"] = c.cosine, c.max_rel
            rows.append(row)
        out[name] = rows
    return out


def layer_table(layers: dict[str, list[dict[str, Any]]]) -> str:
    out = []
    for name, rows in layers.items():
        out.append(f"== per-layer hidden states against {name} (first sample; * = an SCR layer)")
        out.append(f"{'layer':>6} {'cosine SCR':>12} {'cosine no SCR':>14} {'max rel SCR':>12} {'max rel no SCR':>15}")
        for r in rows:
            out.append(f"{r['layer']:>5}{'*' if r['scr_layer'] else ' '} {r['cosine_scr']:>12.7f} "
                       f"{r['cosine_off']:>14.7f} {r['max_rel_scr']:>12.3e} {r['max_rel_off']:>15.3e}")
    return "\n".join(out)


def validate_directory(directory: str | Path, *, family: Any = None, images=None, prompts=None, steps: int = 16,
                       device: str = "auto", runtime: str = "auto", attention: str = "auto"):
    """Compare the deployed run of ``directory`` with the PyTorch reference of the manifest's checkpoint.

    The runtime is opened through the runtime registry (``runtimes.registry.open_runtime``) and judged against the
    float32 model with the gate it names (``float_gate``). A runtime with an engine reference (``engine_reference``:
    GGUF's dequantized weights, a quantized ONNX graph run unfused) is also judged against it, kernel error apart
    from quantization error; then the result is ``{engine name: ..., "float": ...}``, else one report.
    """
    if family is not None:  # the caller holds the reference in memory anyway
        runner, family = open_for_validation(directory, family=family, device=device, runtime=runtime,
                                             attention=attention)
        if images is None:
            images, prompts = default_inputs()
        return compare_inputs(runner, family, runner.encode(images, prompts), steps)
    return validate_in_sequence(directory, images=images, prompts=prompts, steps=steps, device=device,
                                runtime=runtime, attention=attention)


def reference_gate(gate: str, dtype: str) -> str:
    """The gate against a reference computed at ``dtype``: a float16 / bfloat16 reference (``--reference-dtype``,
    e.g. a 7B model on a GPU) differs from the float32 model by its own rounding, so the fp32 gate (1e-4) cannot
    hold and fp16's applies; the quantized gates are looser than that rounding and stay."""
    return "fp16" if dtype != "float32" and gate == "fp32" else gate


def validate_in_sequence(directory: str | Path, *, images=None, prompts=None, steps: int = 16, device: str = "auto",
                         runtime: str = "auto", attention: str = "auto", reference_device: str = "cpu",
                         reference_dtype: str = "float32"):
    """``validate_directory`` with the models in memory one after the other: the runtime encodes the inputs and
    lets go of its weights (``release``, where it has it), the PyTorch reference is loaded, run and freed (with
    the engine reference, which may reuse its weights in place), and only then does the deployed model run. The
    peak is the larger of the two, not their sum (a 7B float32 reference alone is 28 GB)."""
    import gc

    from runtimes.registry import open_runtime

    runner = open_runtime(directory, runtime, device=device, attention=attention)
    if images is None:
        images, prompts = default_inputs()
    inputs = runner.encode(images, prompts)
    release = getattr(runner, "release", None)
    if release is not None:
        release()
    from .reference import TorchReference

    family = load_reference(runner.manifest, device=reference_device, dtype=reference_dtype)
    cfg = runner.config
    runs = {"float": (reference_runs(TorchReference(family), inputs, cfg, steps),
                      reference_gate(runner.float_gate(), reference_dtype))}
    engine = runner.engine_reference(family, inputs, in_place=True)  # after the float runs: may reuse its weights
    if engine is not None:
        runs = {engine[0]: (reference_runs(engine[1], inputs, cfg, steps), engine[2]), **runs}
        if release is not None:
            release()  # the cached engine reference (the deployed model reloads when it runs)
    del family, engine
    gc.collect()
    _trim_heap()
    reports = {name: judge(runner, ref, inputs, cfg, steps, gate) for name, (ref, gate) in runs.items()}
    return reports["float"] if len(reports) == 1 else reports


def _trim_heap() -> None:
    """Give the freed reference's memory back to the system (glibc keeps freed heap pages; where there is no glibc,
    nothing to do)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def load_reference(manifest: dict, device: str = "cpu", dtype: str = "float32") -> Any:
    """The PyTorch model of the manifest's checkpoint (its hash checked), float32 on the CPU unless asked."""
    from .loading import load_vlm
    from .manifest import checkpoint_hash

    family = load_vlm(manifest["source"]["model"], device=device, dtype=dtype)
    if checkpoint_hash(family.path) != manifest["source"]["sha256"]:
        raise SCRExportError(f"the checkpoint {manifest['source']['model']} changed since the conversion "
                             "(its hash differs from the manifest's)", "convert again from the current checkpoint")
    return family


def report_to_dict(report) -> dict:
    return {k: r.to_dict() for k, r in report.items()} if isinstance(report, dict) else report.to_dict()


def write_report(report, path: str | Path, extra: dict | None = None) -> None:
    """Write atomically (a half-written report is worse than none); ``extra`` adds top-level entries."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**report_to_dict(report), **(extra or {})}, indent=2))
    os.replace(tmp, path)
