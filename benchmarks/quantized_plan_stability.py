"""Measurement (not a test): how each quantization choice moves SCR's plan, against the float32 PyTorch reference.

    python benchmarks/quantized_plan_stability.py [--model small-llava] [--work DIR] [--images N]

For each choice it computes, over N images (the calibration examples and synthetic ones, each with a prompt), the
plan of the deployed pipeline and the reference's plan, and prints the mean and worst source Jaccard and the share of
identical plans:
  * the diagnostic graph quantized like the decoder (`--diagnostic-precision same`) at int8, int4 and fp8;
  * int4 with an int8 weight-only diagnostic graph (`w8`, the int4 default on ONNX Runtime);
  * the diagnostic graph float32 (`--diagnostic-precision float`): the fp32 graphs' plan;
  * the vision encoder int8 weight-only (MatMulNBits, 8 bits), with a float32 diagnostic graph: what quantizing
    the vision tower would cost (scr-export keeps it float32).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _jaccard(a, b) -> float:
    sa, sb = set(map(int, a)), set(map(int, b))
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


def vision_int8(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose vision encoder's linear layers are int8 weight-only (MatMulNBits, bits=8)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from graph_passes.io import load_model, save_model

    shutil.copytree(src, dst)
    for p in dst.glob("vision_encoder.onnx*"):
        p.unlink()
    model = onnx.load(str(src / "vision_encoder.onnx"))
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=1, bits=8)
    q = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=1, algo_config=cfg)
    q.process()
    tmp = dst / "vq"
    tmp.mkdir()
    q.model.save_model_to_file(str(tmp / "vision_encoder.onnx"), use_external_data_format=True)
    save_model(load_model(tmp / "vision_encoder.onnx"), dst / "vision_encoder.onnx")
    shutil.rmtree(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llava")
    ap.add_argument("--work", help="directory of converted models (shared with quantized_onnx.py --work)")
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()

    from calibration.data import DEFAULT_PROMPTS, load_calibration_data, synthetic_images
    from calibration.quantize import QuantizeSpec, convert_quantized
    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.convert import convert_to_onnx
    from scr_export.loading import load_vlm
    from scr_export.reference import plan_for_inputs

    work = Path(args.work or tempfile.mkdtemp(prefix="scr-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[plan] {m}", file=sys.stderr)  # noqa: E731
    dirs = {"fp32 (float diagnostic)": work / "fp32", "int8, diagnostic int8": work / "int8",
            "fp8, diagnostic fp8": work / "fp8", "int4, diagnostic int4": work / "int4-same",
            "int4, diagnostic w8 (default)": work / "int4", "vision int8 weight-only": work / "vision-int8"}
    for name, d in dirs.items():
        if d.exists():
            continue
        log(f"preparing {name}")
        if d.name == "fp32":
            convert_to_onnx(args.model, d, progress=log)
        elif d.name == "vision-int8":
            vision_int8(work / "fp32", d)
        else:
            precision, _, diag = d.name.partition("-")
            convert_quantized(args.model, d, spec=QuantizeSpec(precision, diagnostic=diag or "auto"), progress=log)
    examples = load_calibration_data(ROOT / "examples" / "calibration").samples
    images = [s.image for s in examples] + synthetic_images(max(0, args.images - len(examples)))
    images = images[: args.images]
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(len(images))]
    fam = load_vlm(args.model)
    refs = None
    print(f"model {args.model}: plan agreement with the float32 PyTorch reference over {len(images)} images")
    print(f"{'choice':<32} {'mean Jaccard':>12} {'worst':>7} {'identical':>10}")
    for name, d in dirs.items():
        runner = OrtVLM(d, device="cpu")
        inputs = [runner.encode([[im]], [pr]) for im, pr in zip(images, prompts)]
        if refs is None:
            refs = [plan_for_inputs(fam, x, runner.config) for x in inputs]
        jac, same = [], 0
        for x, ref in zip(inputs, refs):
            plan = runner.plan(x)
            jac.append(_jaccard(ref.images[0].sources, plan.images[0].sources))
            same += bool(np.array_equal(ref.donor, plan.donor) and np.array_equal(ref.scale, plan.scale))
        print(f"{name:<32} {np.mean(jac):>12.3f} {min(jac):>7.3f} {same:>5}/{len(jac)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
