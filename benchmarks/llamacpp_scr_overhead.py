"""Benchmark (not a test): the cost of SCR in llama.cpp (eval-callback hooks), as ratios.

    python benchmarks/llamacpp_scr_overhead.py [--model small-llava] [--quant q8_0] [--repeats 10] [--threads 2]

Converts the model to GGUF once, then reports medians after warm-up:
  * image prefill with the SCR hooks editing l_out of the SCR layers / the same prefill in a context without any
    eval callback (plain llama.cpp)
  * one decode step in the hooked context (callback installed, inactive) / plain
  * the diagnostic pass (reading kq_soft_max of the diag layers) / a plain prefill
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llava")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", default=str(ROOT / "examples" / "red_car.png"))
    args = ap.parse_args()

    from runtimes.llamacpp.context import LlamaContext
    from runtimes.llamacpp.convert import convert_to_gguf
    from runtimes.llamacpp.runner import LlamaCppVLM
    from runtimes.llamacpp.scr_hooks import install_redistribution
    from scr_export.processing import load_image

    work = Path(tempfile.mkdtemp(prefix="scr-llama-bench-"))
    out, reports = convert_to_gguf(args.model, work / "g", quant=args.quant,
                                   progress=lambda m: print(f"[bench] {m}", file=sys.stderr))
    runner = LlamaCppVLM(out, threads=args.threads)
    plain = LlamaContext(out / runner.manifest["gguf"]["file"], n_ctx=runner.llama.n_ctx, threads=args.threads,
                         with_callback=False)
    inputs = runner.encode([[load_image(args.image)]], ["What is the red object? Answer in one sentence."])
    embeds = runner.images.embed(inputs).astype(np.float32)[0]
    config = runner.config
    plan = runner.generate(inputs, max_new_tokens=1).plan
    hooked, cb = runner.llama, runner.llama.callback

    def prefill_plain():
        plain.reset()
        plain.decode_embeddings(embeds, want_logits=False)

    def prefill_scr():
        cb.handlers.clear()
        install_redistribution(cb, config, plan.donor[0], plan.scale[0], plan.weight[0])
        hooked.reset()
        cb.active = True
        try:
            hooked.decode_embeddings(embeds, want_logits=False)
        finally:
            cb.active = False
            cb.handlers.clear()

    def diagnostic():
        runner.attention_maps(inputs, embeds[None], config)

    t_plain = median_ms(prefill_plain, args.repeats)
    t_scr = median_ms(prefill_scr, args.repeats)
    t_diag = median_ms(diagnostic, args.repeats)
    prefill_plain()
    prefill_scr()
    tok = int(inputs.input_ids[0, -1])

    def step(ctx):
        def run():
            ctx.decode_token(tok)
            ctx.truncate(ctx.n_past - 1)  # the same position every time
        return run

    t_step_plain = median_ms(step(plain), args.repeats * 3)
    t_step_hooked = median_ms(step(hooked), args.repeats * 3)
    n_img = sum(s.size for s in inputs.layouts[0])
    print(f"model {args.model} ({args.quant}): {inputs.shape[1]} prompt tokens ({n_img} image tokens), "
          f"SCR at layers {config.layers[0]}..{config.layers[1]}, diag {config.diag_layers[0]}..{config.diag_layers[1]}, "
          f"llama.cpp CPU, {args.threads} threads, median of {args.repeats}")
    print(f"prefill     SCR hooks / plain llama.cpp : {t_scr / t_plain:6.3f}  ({t_scr:.1f} / {t_plain:.1f} ms)")
    print(f"decode step hooked ctx / plain          : {t_step_hooked / t_step_plain:6.3f}  "
          f"({t_step_hooked:.2f} / {t_step_plain:.2f} ms)")
    print(f"diagnostic pass / plain prefill         : {t_diag / t_plain:6.3f}  ({t_diag:.1f} ms)")
    print(f"parity at conversion (dequantized reference): {'PASS' if reports['dequantized'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
