"""Benchmark (not a test): the cost of SCR inside the ONNX Runtime graphs, as ratios.

    python benchmarks/onnx_scr_overhead.py [--model small-llava] [--repeats 20] [--threads 2]

Exports the model once with SCR (scr-export convert) and once more as the same decoder without the SCR nodes,
then reports, as median of repeated runs after warm-up:
  * prefill with SCR nodes / prefill without them (same inputs; the plan of a real image)
  * one decode step with SCR nodes (identity plan) / without them
  * the diagnostic pass / a full prefill with SCR
  * the whole SCR response overhead (diagnostic + SCR prefill - plain prefill) per generated token at 100 tokens
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
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--image", default=str(ROOT / "examples" / "red_car.png"))
    args = ap.parse_args()

    import onnxruntime as ort

    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.convert import convert_to_onnx
    from scr_export.loading import load_vlm
    from scr_export.onnx_export.decoder import export_decoder
    from scr_export.plan import SequencePlan
    from scr_export.processing import load_image

    work = Path(tempfile.mkdtemp(prefix="scr-bench-"))
    print(f"[bench] converting {args.model} (with SCR) into {work}", file=sys.stderr)
    out, report = convert_to_onnx(args.model, work / "scr", progress=lambda m: print(f"[bench] {m}", file=sys.stderr))
    print("[bench] exporting the same decoder without SCR nodes", file=sys.stderr)
    (work / "plain").mkdir()
    export_decoder(load_vlm(args.model), work / "plain" / "decoder.onnx")

    runner = OrtVLM(out, device="cpu", threads=args.threads or None)
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(str(work / "plain" / "decoder.onnx"), opts, providers=runner.providers)
    inputs = runner.encode([[load_image(args.image)]], ["What is the red object? Answer in one sentence."])
    embeds = runner.embed(inputs)
    positions = runner.family.forward_inputs(inputs.tensors)["position_ids"].numpy()
    plan = runner.plan(inputs)
    am = inputs.attention_mask.numpy()
    base = {"inputs_embeds": embeds, "attention_mask": am, "position_ids": positions, **runner._past(1)}
    scr_feed = {**base, "scr_donor": plan.donor, "scr_scale": plan.scale, "scr_weight": plan.weight}
    dec = runner._session("decoder")  # the eager decoder: the plain graph below has eager attention
    names = [o.name for o in dec.get_outputs()]
    outs = dict(zip(names, dec.run(None, scr_feed)))

    ident = SequencePlan.identity(1, 1)
    step = {"inputs_embeds": embeds[:, -1:], "attention_mask": np.ones((1, am.shape[1] + 1), np.int64),
            "position_ids": positions[..., -1:] + 1}
    for i in range(runner.num_layers):
        for k in ("key", "value"):
            step[f"past_key_values.{i}.{k}"] = outs[f"present.{i}.{k}"]
    step_scr = {**step, "scr_donor": ident.donor, "scr_scale": ident.scale, "scr_weight": ident.weight}

    t_prefill_scr = median_ms(lambda: dec.run(["logits"], scr_feed), args.repeats)
    t_prefill = median_ms(lambda: plain.run(["logits"], base), args.repeats)
    t_step_scr = median_ms(lambda: dec.run(["logits"], step_scr), args.repeats * 3)
    t_step = median_ms(lambda: plain.run(["logits"], step), args.repeats * 3)
    t_diag = median_ms(lambda: runner.attention_maps(inputs, embeds, positions), args.repeats)
    t_plan = median_ms(lambda: __import__("scr_export.plan", fromlist=["plan_sequence"]).plan_sequence(
        inputs.layouts, plan.attention, inputs.shape[1], runner.config), args.repeats)

    seq = inputs.shape[1]
    overhead_ms = t_diag + t_plan + t_prefill_scr - t_prefill
    print(f"model {args.model}: {seq} prompt tokens ({sum(s.size for s in inputs.layouts[0])} image tokens), "
          f"{runner.num_layers} layers, SCR at layers {runner.config.layers[0]}..{runner.config.layers[1]}, "
          f"provider {runner.provider}, threads {args.threads or 'default'}, median of {args.repeats} runs")
    print(f"prefill        with SCR / without : {t_prefill_scr / t_prefill:6.3f}  ({t_prefill_scr:.1f} / {t_prefill:.1f} ms)")
    print(f"decode step    with SCR / without : {t_step_scr / t_step:6.3f}  ({t_step_scr:.2f} / {t_step:.2f} ms)")
    print(f"diagnostic     / full SCR prefill : {t_diag / t_prefill_scr:6.3f}  ({t_diag:.1f} ms)")
    print(f"host plan      / full SCR prefill : {t_plan / t_prefill_scr:6.4f}  ({t_plan:.2f} ms)")
    print(f"SCR overhead per response / plain prefill: {overhead_ms / t_prefill:6.3f}; per token at 100 tokens: "
          f"{overhead_ms / 100:.2f} ms = {overhead_ms / 100 / t_step:.3f} decode steps")
    print(f"parity at conversion: {'PASS' if report else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
