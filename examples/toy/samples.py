"""Draw the shapes world's sample sheet (docs/shapes-world.png): held-out adversarial pictures with their captions
and POPE questions, as the README shows them.

    python examples/toy/samples.py [--out docs/shapes-world.png] [--size 96]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from scr_export import plots, toyworld  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "shapes-world.png")
    ap.add_argument("--size", type=int, default=192, help="picture side in pixels (the toy models see 96)")
    args = ap.parse_args(argv)
    popular = toyworld.popular_order()
    samples = []
    for i in range(8):
        seed = toyworld.EVAL_SEED + 2 * 100_000 + i  # the adversarial split's seeds: half hold a lone anchor
        pic, scene = toyworld.make_scene(seed, args.size, lone_anchor=i % 2 == 0)
        rng = np.random.default_rng(seed + 7)
        qs = list(toyworld.questions(scene, "adversarial", rng, popular, per_image=1))
        q, label, _ = qs[i // 2 % 2 - 1]  # a yes and a no question, in turn
        samples.append((pic, scene.caption(), f"{q} -> {label}"))
    plots.save_png(plots.world_figure(samples), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
