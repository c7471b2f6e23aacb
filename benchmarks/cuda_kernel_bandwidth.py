"""Benchmark (not a test; needs a CUDA GPU and nvcc): the SCRNeighbourInject CUDA kernel's effective bandwidth as a
fraction of a device-to-device copy of the same hidden states, and its numerics against numpy.

    python benchmarks/cuda_kernel_bandwidth.py [--repeats 200]

For hidden states [1, T, D] with a real plan (32 sources × 8 neighbours edited, the rest copied) the kernel moves
about the bytes of a copy (read h, write out, plus the donor rows), so kernel time / copy time near 1 means it runs
at copy bandwidth. Prints, per dtype and shape: kernel µs, copy µs, copy/kernel (the fraction of copy bandwidth),
and the max |error| against the numpy reference (0 expected: same float32 rounding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to measure (run on a GPU machine)", file=sys.stderr)
        return 2
    from graph_passes import reference
    from runtimes.kernels.launch import launch_on_torch
    from scr_export import SCRConfig, plan_redistribution

    print(f"GPU: {torch.cuda.get_device_name()}, median of {args.repeats}")
    print(f"{'dtype':<9} {'[1,T,D]':<14} {'kernel us':>10} {'copy us':>9} {'copy/kernel':>12} {'max|err|':>9}")
    rng = np.random.default_rng(0)
    for t, d in ((641, 4096), (2048, 4096), (4096, 8192)):
        donor = np.arange(t)[None].copy()
        scale, weight = np.ones((1, t), np.float32), np.zeros((1, t), np.float32)
        p = plan_redistribution(rng.random(576), (24, 24), SCRConfig())
        donor[0, 5:581], scale[0, 5:581], weight[0, 5:581] = 5 + p.donor, p.scale, p.weight
        for dtype, tdt in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            h = torch.randn(1, t, d, device="cuda").to(tdt)
            dn, sc, wt = (torch.from_numpy(x).cuda() for x in (donor, scale, weight))
            out = torch.empty_like(h)
            copy = torch.empty_like(h)

            def timed(fn):
                for _ in range(10):
                    fn()
                times = []
                for _ in range(args.repeats):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b) * 1e3)
                return float(np.median(times))

            tk = timed(lambda: launch_on_torch(h, dn, sc, wt, out))
            tc = timed(lambda: copy.copy_(h))
            ref = reference(h.float().cpu().numpy().astype(np.float32), donor, scale, weight)
            got = out.float().cpu().numpy()
            if dtype != "float32":
                ref = torch.from_numpy(ref).to(tdt).float().numpy()
            err = float(np.abs(got - ref).max())
            print(f"{dtype:<9} [1,{t},{d}]{'':<{14 - len(f'[1,{t},{d}]')}} {tk:>10.1f} {tc:>9.1f} {tc / tk:>12.3f} "
                  f"{err:>9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
