"""Benchmark (not a test): the cost of SCR in llama.cpp (eval-callback hooks), as ratios.

    python benchmarks/llamacpp_scr_overhead.py [--model small-llava] [--quant q8_0] [--repeats 10] [--threads 2]
                                               [--diag-layers FIRST LAST]

Converts the model to GGUF once, then reports medians after warm-up, each against plain llama.cpp (a context
without any eval callback, sharing the same loaded model):
  * image prefill with the SCR hooks editing l_out of the SCR layers / the same prefill, plain
  * one decode step of the runner (the prompt's KV cache moved to its callback-free context) / plain, and the same
    step in the hooked context (the route before: the callback asked about every node) / plain
  * moving the prompt's KV cache between the contexts (once per request) / a plain prefill
  * the diagnostic pass, stopped after the last diagnostic layer / a plain prefill, next to the layer fraction
    (last diagnostic layer + 1) / layers, and the whole-prefill diagnostic pass (the route before) / plain
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _timing import interleaved_ms, median_ms  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llava")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", default=str(ROOT / "examples" / "red_car.png"))
    ap.add_argument("--diag-layers", type=int, nargs=2, metavar=("FIRST", "LAST"),
                    help="diagnostic layers (default: the model's); the cut pass should cost (LAST + 1) / layers")
    args = ap.parse_args()

    from runtimes.llamacpp.context import LlamaContext
    from runtimes.llamacpp.convert import convert_to_gguf
    from runtimes.llamacpp.eval_callback import EvalCallback
    from runtimes.llamacpp.runner import DECODE_UBATCH, LlamaCppVLM
    from runtimes.llamacpp.scr_hooks import install_redistribution
    from scr_export.processing import load_image

    work = Path(tempfile.mkdtemp(prefix="scr-llama-bench-"))
    overrides = {"diag_layers": tuple(args.diag_layers)} if args.diag_layers else None
    out, reports = convert_to_gguf(args.model, work / "g", quant=args.quant, config_overrides=overrides,
                                   progress=lambda m: print(f"[bench] {m}", file=sys.stderr))
    runner = LlamaCppVLM(out, threads=args.threads)
    inputs = runner.encode([[load_image(args.image)]], ["What is the red object? Answer in one sentence."])
    embeds = runner.embed(inputs)
    runner._prefill_context(inputs.shape[1])

    def context(**kw):  # every comparison is between contexts of the same sizes, sharing the loaded model
        return LlamaContext(threads=args.threads, share_model_of=runner.decoder, **kw)

    plain = context(n_ctx=runner.llama.n_ctx, with_callback=False)  # the hooked prefill's twin, without callback
    # Decode steps: contexts differ by a few % from where their memory landed, so each route gets three contexts and
    # the medians are compared; the plain ones' spread is printed as the noise floor.
    decode_kw = dict(n_ctx=runner.n_ctx, n_ubatch=DECODE_UBATCH)
    routes = {"runner": [runner.decoder] + [context(**decode_kw, with_callback=False) for _ in range(2)],
              "plain": [context(n_ctx=runner.n_ctx, with_callback=False) for _ in range(3)],  # prefill themselves
              "hooked": [context(n_ctx=runner.n_ctx, callback=EvalCallback()) for _ in range(3)]}  # route before

    config = runner.config.clamped(runner.family.num_layers)
    plan = runner.generate(inputs, max_new_tokens=1).plan
    cb = runner.callback

    def prefill_plain():
        plain.reset()
        plain.decode_embeddings(embeds[0], want_logits=False)

    def prefill_scr():
        cb.handlers.clear()
        install_redistribution(cb, config, plan.donor[0], plan.scale[0], plan.weight[0])
        runner._hooked_prefill(inputs, embeds, want_logits=False)

    def diagnostic(cut):
        def run():
            runner.cut_diagnostic = cut
            runner.attention_maps(inputs, embeds, config)
        return run

    t = interleaved_ms({"plain": prefill_plain, "scr": prefill_scr, "diag": diagnostic(True),
                        "diag_full": diagnostic(False)}, args.repeats)
    t_plain, t_scr, t_diag, t_diag_full = t["plain"], t["scr"], t["diag"], t["diag_full"]
    runner.cut_diagnostic = True

    prefill_scr()
    t_move = median_ms(lambda: runner.llama.copy_state_to(runner.decoder), args.repeats)
    for ctx in routes["runner"]:
        runner.llama.copy_state_to(ctx)  # the runner's route: hooked prefill, KV cache moved
    for ctx in routes["plain"] + routes["hooked"]:  # stock llama.cpp: the context prefills itself
        ctx.reset()
        ctx.decode_embeddings(embeds[0], want_logits=False)
    tok = int(inputs.array("input_ids")[0, -1])

    def step(ctx):
        t0 = time.perf_counter()
        ctx.decode_token(tok)
        dt = time.perf_counter() - t0
        ctx.truncate(ctx.n_past - 1)  # the same position every time
        return dt * 1e3

    # single steps interleaved in rotating order: drift of a shared machine hits every context alike
    contexts = [(k, c) for k, cs in routes.items() for c in cs]
    times: list[list[float]] = [[] for _ in contexts]
    for i in range(args.repeats * 30):
        for j in [(i + o) % len(contexts) for o in range(len(contexts))]:
            times[j].append(step(contexts[j][1]))
    med = [float(np.median(t[30:])) for t in times]
    by_route = {k: [m for (r, _), m in zip(contexts, med) if r == k] for k in routes}
    t_step_runner, t_step_plain, t_step_hooked = (float(np.median(by_route[k])) for k in ("runner", "plain", "hooked"))
    twins = by_route["plain"]
    n_img = sum(s.size for s in inputs.layouts[0])
    layers = runner.family.num_layers
    last = max(config.diag_layer_indices())
    print(f"model {args.model} ({args.quant}): {inputs.shape[1]} prompt tokens ({n_img} image tokens), {layers} "
          f"layers, SCR at layers {config.layers[0]}..{config.layers[1]}, diag {config.diag_layers[0]}..{last}, "
          f"llama.cpp CPU, {args.threads} threads, median of {args.repeats}")
    print(f"prefill      SCR hooks / plain llama.cpp          : {t_scr / t_plain:6.3f}  ({t_scr:.1f} / {t_plain:.1f} ms)")
    print(f"decode step  runner (callback-free ctx) / plain   : {t_step_runner / t_step_plain:6.3f}  "
          f"({t_step_runner:.2f} / {t_step_plain:.2f} ms)")
    print(f"decode step  hooked ctx (route before) / plain    : {t_step_hooked / t_step_plain:6.3f}  "
          f"({t_step_hooked:.2f} ms)")
    print(f"decode step  the plain contexts' spread (noise)   : {min(twins) / t_step_plain:6.3f} .. "
          f"{max(twins) / t_step_plain:.3f}")
    print(f"KV move      once per request / plain prefill     : {t_move / t_plain:6.3f}  ({t_move:.2f} ms)")
    print(f"diagnostic   cut after layer {last} / plain prefill     : {t_diag / t_plain:6.3f}  ({t_diag:.1f} ms; "
          f"layer fraction {(last + 1) / layers:.3f})")
    print(f"diagnostic   whole prefill (route before) / plain : {t_diag_full / t_plain:6.3f}  ({t_diag_full:.1f} ms)")
    print(f"parity at conversion (dequantized reference): {'PASS' if reports['dequantized'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
