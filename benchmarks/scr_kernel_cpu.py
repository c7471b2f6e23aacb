"""Benchmark (not a test): the C++ SCRNeighbourInject kernel (ORT custom-op library) against the node's ONNX function
body (standard ops inlined by ONNX Runtime), on the CPU, as ratios.

    python benchmarks/scr_kernel_cpu.py [--repeats 50] [--threads 2] [--model small-llava]

  * one SCR node on hidden states [1, T, D] with a real plan (32 sources, 8 neighbours each), fp32 and fp16
  * a full SCR prefill of --model with the library / with the function body (same graph, same plan)
Builds the CPU library first if needed (scr-export build-ops).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _timing import median_ms  # noqa: E402


def real_plan(t: int, rows: int = 24, cols: int = 24, prefix: int = 5):
    from scr_export import SCRConfig, plan_redistribution

    rng = np.random.default_rng(0)
    donor = np.arange(t)[None].copy()
    scale = np.ones((1, t), np.float32)
    weight = np.zeros((1, t), np.float32)
    p = plan_redistribution(rng.random(rows * cols), (rows, cols), SCRConfig())
    donor[0, prefix:prefix + rows * cols] = prefix + p.donor
    scale[0, prefix:prefix + rows * cols] = p.scale
    weight[0, prefix:prefix + rows * cols] = p.weight
    return donor, scale, weight


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="small-llava", help="preset or checkpoint for the prefill comparison "
                    "('' skips it)")
    args = ap.parse_args()

    import onnx_ir as ir
    import onnxruntime as ort

    from graph_passes import standalone_model
    from runtimes.kernels.build import build_cpu_library

    lib = build_cpu_library(lambda m: print(f"[bench] {m}", file=sys.stderr))

    def sess(dtype, with_lib):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        if with_lib:
            so.register_custom_ops_library(str(lib))
        return ort.InferenceSession(ir.to_proto(standalone_model(dtype)).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])

    print(f"SCRNeighbourInject on the CPU, ORT {ort.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"{'hidden [1,T,D]':<18} {'dtype':<8} {'library ms':>11} {'function ms':>12} {'library/function':>17}")
    for t, d in ((641, 512), (641, 4096), (2048, 4096)):
        donor, scale, weight = real_plan(t)
        for dtype in ("float32", "float16"):
            h = np.random.default_rng(1).standard_normal((1, t, d)).astype(dtype)
            feed = {"hidden": h, "donor": donor, "scale": scale, "weight": weight}
            a, b = sess(dtype, True), sess(dtype, False)
            ta = median_ms(lambda: a.run(None, feed), args.repeats)
            tb = median_ms(lambda: b.run(None, feed), args.repeats)
            print(f"[1,{t},{d}]{'':<{18 - len(f'[1,{t},{d}]')}} {dtype:<8} {ta:>11.3f} {tb:>12.3f} {ta / tb:>17.3f}")

    if args.model:
        from runtimes.onnxruntime_runner import OrtVLM
        from scr_export.convert import convert_to_onnx
        from scr_export.processing import load_image

        out = Path(tempfile.mkdtemp(prefix="scr-bench-")) / "m"
        convert_to_onnx(args.model, out, progress=lambda m: print(f"[bench] {m}", file=sys.stderr))
        runners = {k: OrtVLM(out, device="cpu", threads=args.threads, scr_kernel=k) for k in ("library", "function")}
        inputs = runners["library"].encode([[load_image(str(ROOT / "examples" / "red_car.png"))]],
                                           ["What is the red object?"])
        plan = runners["library"].plan(inputs)
        times = {k: median_ms(lambda r=r: r.generate(inputs, plan=plan, max_new_tokens=1), max(5, args.repeats // 5))
                 for k, r in runners.items()}
        print(f"{args.model} SCR prefill ({inputs.shape[1]} tokens, {runners['library'].num_layers} layers): "
              f"library / function = {times['library'] / times['function']:.3f} "
              f"({times['library']:.1f} / {times['function']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
