"""Benchmark (not a test): SCR and quantization judged on answers, over the shapes world's POPE files (issue 21).

    python benchmarks/toy_pope.py [--preset toy-llava] [--precisions fp32,fp16,int8,int4,fp8,q8_0,q4_0,q4_k_m]
                                  [--splits random,popular,adversarial] [--limit N] [--work DIR] [--json FILE]
    python benchmarks/toy_pope.py --smoke     # one precision, one split, 6 questions: what the test suite runs

For each precision the trained preset is converted (`scr-export convert ... --no-validate`; int8 / fp8 calibrated
on examples/shapes-calibration: pictures from the training distribution, never the held-out ones) and
`scr-export validate DIR --data examples/shapes-pope/<split>.jsonl` is run on it: the logits gates on the aggregate
and POPE's accuracy / F1 / yes-ratio of the reference and of the deployed model, each with SCR and without. Printed per precision and split:

    precision  split  ref SCR  ref off  SCR gain  deployed SCR  deployed off  SCR gain  answers = ref  gates

(accuracy; F1 and yes-ratio in the JSON). "SCR gain" is accuracy with SCR minus accuracy without, so a reader sees
whether SCR's effect survives the deployment. Every conversion and validation runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POPE = ROOT / "examples" / "shapes-pope"
ONNX = ("fp32", "fp16", "int8", "int4", "fp8")
GGUF = ("q8_0", "q4_0", "q4_k_m")
CALIB = ROOT / "examples" / "shapes-calibration"  # training-distribution pictures (toyworld.write_calibration)


def cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scr_export.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def convert(model: str, precision: str, out: Path, calib: Path) -> tuple[bool, str]:
    if (out / "manifest.json").is_file():
        return True, ""
    if precision in GGUF:
        args = ["--to", "gguf", "--quant", precision]
    else:
        args = ["--to", "onnx", "--precision", precision]
        if precision in ("int8", "fp8"):
            args += ["--calib-data", str(calib)]
    res = cli("convert", model, *args, "--out", str(out), "--no-validate")
    return res.returncode == 0, (res.stderr or res.stdout)[-1500:]


def judge(directory: Path, split: str, limit: int | None, out: Path) -> dict:
    args = ["validate", str(directory), "--data", str(POPE / f"{split}.jsonl"), "--steps", "2", "--json", str(out)]
    if limit:
        args += ["--limit", str(limit)]
    t0 = time.time()
    res = cli(*args)
    if res.returncode not in (0, 1) or not out.is_file():
        return {"error": (res.stderr or res.stdout)[-1500:]}
    report = json.loads(out.read_text())
    failures = [f"{name}: {f}" for name, c in report["comparisons"].items() for f in c["failures"]]
    return {"passed": report["passed"], "failures": failures, "pope": report["pope"], "seconds": time.time() - t0,
            "samples": len(report["samples"])}


def row(precision: str, split: str, r: dict) -> str:
    if "error" in r:
        return f"{precision:<8}{split:<13}error: {r['error'].strip().splitlines()[-1][:90]}"
    p = r["pope"]
    acc = {k: p[k]["accuracy"] for k in ("reference_scr", "reference_off", "deployed_scr", "deployed_off")}
    gates = "PASS" if r["passed"] else f"FAIL ({len(r['failures'])})"
    return (f"{precision:<8}{split:<13}{acc['reference_scr']:>8.3f}{acc['reference_off']:>8.3f}"
            f"{acc['reference_scr'] - acc['reference_off']:>+9.3f}{acc['deployed_scr']:>13.3f}"
            f"{acc['deployed_off']:>13.3f}{acc['deployed_scr'] - acc['deployed_off']:>+9.3f}"
            f"{p['agreement_scr']:>9.3f}/{p['agreement_off']:.3f}  {gates}")


HEAD = (f"{'prec.':<8}{'split':<13}{'ref SCR':>8}{'ref off':>8}{'SCR gain':>9}{'dep. SCR':>13}{'dep. off':>13}"
        f"{'SCR gain':>9}{'same answers':>16}  gates")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy-llava", help="a preset name or a checkpoint directory (a training run's)")
    ap.add_argument("--precisions", default=",".join(ONNX + GGUF))
    ap.add_argument("--splits", default="random,popular,adversarial")
    ap.add_argument("--limit", type=int, default=None, help="questions per split (default: all)")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.precisions, args.splits, args.limit = "fp32", "adversarial", 6
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [p for p in precisions if p not in ONNX + GGUF]
    if unknown:
        print(f"error: unknown precision {', '.join(unknown)}: use {', '.join(ONNX + GGUF)}", file=sys.stderr)
        return 2
    from scr_export.errors import SCRExportError
    from scr_export.presets import ensure_preset

    try:
        model = Path(args.preset) if (Path(args.preset) / "config.json").is_file() else ensure_preset(args.preset)
    except SCRExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="toy-pope-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = CALIB
    results: dict[str, dict[str, dict]] = {}
    print(f"== {args.preset} ({model}) over {POPE.relative_to(ROOT)}: accuracy; SCR gain = with SCR - without")
    print(HEAD)
    status = 0
    for precision in precisions:
        directory = work / f"{Path(args.preset).name}-{precision}"
        ok, tail = convert(str(model), precision, directory, calib)
        results[precision] = {}
        for split in args.splits.split(","):
            r = judge(directory, split, args.limit, work / f"{precision}-{split}.json") if ok else {"error": tail}
            results[precision][split] = r
            status |= "error" in r
            print(row(precision, split, r), flush=True)
            for f in r.get("failures", [])[:3]:
                print(f"{'':<21}{f[:140]}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "results": results}, indent=1))
    return 1 if status else 0


if __name__ == "__main__":
    raise SystemExit(main())
