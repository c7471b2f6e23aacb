"""Benchmark (not a test): quantized ONNX decoders against fp32, against the PyTorch reference, and against the peer
users would pick instead (ONNX Runtime GenAI's model builder), as ratios. One run, ORT CPU.

    python benchmarks/quantized_onnx.py [--model small-llava] [--threads 2] [--repeats 10] [--no-genai]

Converts the model at fp32, int8 and int4 (scr-export convert, SCR nodes in every decoder), then reports:
  * decoder bytes (.onnx + .data) of int8 / int4 against fp32;
  * prefill (SCR on, the plan of a real image) and one decode step (past = the prompt) against fp32;
  * a whole 16-token response (diagnostic + SCR prefill + 15 decode steps) against the PyTorch eager reference;
  * the peer: GenAI's builder on the same language-model weights (saved as a LlamaForCausalLM checkpoint) at fp32
    and int4 (its CPU defaults: blocks of 32, accuracy level 4), same prompt length: its bytes, prefill and decode
    step, and ours against it. Needs `pip install -e '.[bench]'` (onnxruntime-genai); --no-genai skips it.
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

LOOP_STEPS = 64  # decode steps whose mean is "the step in the loop", ours and GenAI's alike


def decoder_bytes(directory: Path, attention: str) -> int:
    """The decoder's weights and graph (with GroupQueryAttention: that graph, over the same weights file)."""
    files = list(directory.glob("decoder_model_merged.onnx*"))
    if attention == "gqa":
        files = [f for f in files if f.suffix != ".onnx"] + [directory / "decoder_model_merged_gqa.onnx"]
    return sum(p.stat().st_size for p in files)


def time_directory(out: Path, attention: str, inputs_of, threads: int, repeats: int) -> dict:
    """Prefill with SCR, one decode step and a 16-token response through the runner, with the directory's eager or
    GroupQueryAttention decoder (then the step on the shared cache, as the runner runs it)."""
    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.plan import SequencePlan

    runner = OrtVLM(out, device="cpu", threads=threads, attention=attention)
    inputs = inputs_of(runner)
    if runner.shared_kv:
        return time_shared_kv(runner, inputs, out, repeats)
    embeds = runner.embed(inputs)
    positions = runner.family.forward_inputs(inputs.tensors)["position_ids"].numpy()
    plan = runner.plan(inputs)
    am = inputs.attention_mask.numpy()
    feed = {"inputs_embeds": embeds, "attention_mask": am, "position_ids": positions, **runner._past(1),
            "scr_donor": plan.donor, "scr_scale": plan.scale, "scr_weight": plan.weight}
    dec = runner._session("decoder")
    names = [o.name for o in dec.get_outputs()]
    outs = dict(zip(names, dec.run(None, feed)))
    ident = SequencePlan.identity(1, 1)
    step = {"inputs_embeds": embeds[:, -1:], "attention_mask": np.ones((1, am.shape[1] + 1), np.int64),
            "position_ids": positions[..., -1:] + 1, "scr_donor": ident.donor, "scr_scale": ident.scale,
            "scr_weight": ident.weight}
    for i in range(runner.num_layers):
        for k in ("key", "value"):
            step[f"past_key_values.{i}.{k}"] = outs[f"present.{i}.{k}"]
    return {
        "loop_step_ms": loop_step_ms(runner, inputs, plan, repeats),
        "bytes": decoder_bytes(out, "eager"), "seq": inputs.shape[1],
        "prefill_ms": median_ms(lambda: dec.run(["logits"], feed), repeats),
        "decode_ms": median_ms(lambda: dec.run(["logits"], step), repeats * 3),
        "response_ms": median_ms(lambda: runner.generate(inputs, max_new_tokens=16, stop_at_eos=False),
                                 max(3, repeats // 3), warmup=1),
    }


def loop_step_ms(runner, inputs, plan, repeats: int, steps: int = LOOP_STEPS) -> float:
    """A decode step as the runner's greedy loop pays it (graph + host work): the time between the token-embedding
    calls of steps 1 and ``steps`` (the runner's recorder sees every feed; the first embedding call is the
    prompt's), divided by the steps between them; median over ``repeats`` responses. GenAI's loop is timed the
    same way (its generate_next_token calls after the prefill)."""
    import time

    stamps: list[float] = []
    runner.recorder = lambda name, feed: stamps.append(time.perf_counter()) if name == "embed_tokens" else None
    per_step = []
    try:
        for i in range(repeats + 1):
            stamps.clear()
            runner.generate(inputs, plan=plan, max_new_tokens=steps + 1, stop_at_eos=False)
            if i:  # the first response warms up
                per_step.append((stamps[-1] - stamps[1]) * 1e3 / (len(stamps) - 2))
    finally:
        runner.recorder = None
    return float(np.median(per_step))


def time_shared_kv(runner, inputs, out: Path, repeats: int) -> dict:
    from scr_export.plan import SequencePlan

    embeds = runner.embed(inputs)
    positions = runner.family.forward_inputs(inputs.tensors)["position_ids"].numpy()
    plan = runner.plan(inputs)
    am = inputs.attention_mask.numpy()
    t = inputs.shape[1]
    feed = {"inputs_embeds": embeds, "attention_mask": am, "position_ids": positions,
            "scr_donor": plan.donor, "scr_scale": plan.scale, "scr_weight": plan.weight}
    cache = runner._gqa_cache(1, t + 64)
    prefill = median_ms(lambda: runner._run_gqa(feed, cache, t), repeats)
    ident = SequencePlan.identity(1, 1)
    step = {"inputs_embeds": embeds[:, -1:], "attention_mask": np.ones((1, t + 1), np.int64),
            "position_ids": positions[..., -1:] + 1, "scr_donor": ident.donor, "scr_scale": ident.scale,
            "scr_weight": ident.weight}
    decode = median_ms(lambda: runner._run_gqa(step, cache, t + 1), repeats * 3)  # rewrites the same row
    return {"loop_step_ms": loop_step_ms(runner, inputs, plan, repeats), "bytes": decoder_bytes(out, "gqa"), "seq": t, "prefill_ms": prefill,
            "decode_ms": decode,
            "response_ms": median_ms(lambda: runner.generate(inputs, max_new_tokens=16, stop_at_eos=False),
                                     max(3, repeats // 3), warmup=1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llava")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--image", default=str(ROOT / "examples" / "red_car.png"))
    ap.add_argument("--no-genai", action="store_true", help="skip the ONNX Runtime GenAI peer")
    ap.add_argument("--work", help="keep the converted directories here (default: a temporary directory)")
    args = ap.parse_args()

    import torch

    from calibration.quantize import QuantizeSpec, convert_quantized
    from scr_export.convert import convert_to_onnx
    from scr_export.loading import load_vlm
    from scr_export.processing import load_image
    from scr_export.reference import generate

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="scr-qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[bench] {m}", file=sys.stderr)  # noqa: E731
    image = load_image(args.image)
    prompt = "What is the red object? Answer in one sentence."
    dirs = {p: work / p for p in ("fp32", "int8", "int4")}
    for p, d in dirs.items():  # the default conversion: the eager decoder and the GroupQueryAttention one
        if d.exists():
            continue
        log(f"converting {args.model} at {p}")
        if p == "fp32":
            convert_to_onnx(args.model, d, progress=log)
        else:
            convert_quantized(args.model, d, spec=QuantizeSpec(p), progress=log)

    inputs_of = lambda r: r.encode([[image]], [prompt])  # noqa: E731
    ours = {}
    for p, d in dirs.items():  # one directory at a time: interleaving them thrashes the caches
        for attention in ("eager", "gqa"):
            ours[p if attention == "eager" else f"{p}+gqa"] = time_directory(d, attention, inputs_of, args.threads,
                                                                             args.repeats)
    fam = load_vlm(args.model)
    from scr_export.processing import encode

    ref_inputs = encode(fam, [[image]], [prompt])
    with torch.no_grad():
        t_eager = median_ms(lambda: generate(fam, ref_inputs, fam.scr_config(), max_new_tokens=16,
                                             stop_at_eos=False), max(3, args.repeats // 3), warmup=1)
    seq = ours["fp32"]["seq"]
    f = ours["fp32"]
    print(f"model {args.model}: {seq} prompt tokens, ORT CPU, {args.threads} threads, median of {args.repeats} runs "
          f"(decode: {args.repeats * 3}); SCR nodes in every decoder; int4 = MatMulNBits blocks of 32 at accuracy "
          "level 4")
    print(f"{'':<8} {'decoder MB':>10} {'bytes/fp32':>10} {'prefill/fp32':>12} {'decode/fp32':>11} "
          f"{'16-tok response/eager':>22}   (prefill ms, decode ms graph / in the runner loop, response ms)")
    for p, r in ours.items():
        print(f"{p:<8} {r['bytes'] / 1e6:>10.1f} {r['bytes'] / f['bytes']:>10.3f} {r['prefill_ms'] / f['prefill_ms']:>12.3f} "
              f"{r['decode_ms'] / f['decode_ms']:>11.3f} {r['response_ms'] / t_eager:>22.3f}   "
              f"({r['prefill_ms']:.1f}, {r['decode_ms']:.2f} / {r['loop_step_ms']:.2f}, {r['response_ms']:.0f})")
    print(f"PyTorch eager 16-token response (SCR, KV cache): {t_eager:.0f} ms")
    if args.no_genai:
        return 0
    try:
        import _genai_peer as peer
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("ONNX Runtime GenAI is not installed: pip install -e '.[bench]' (or pass --no-genai)")
        return 0
    ckpt = peer.save_language_model_checkpoint(fam, work / "llama-ckpt")
    genai = {}
    for p in ("fp32", "int4"):
        d = work / f"genai-{p}"
        if not d.exists():
            log(f"building the GenAI {p} model")
            peer.build_genai_model(ckpt, d, p)
        genai[p] = {**peer.time_genai(d, seq, threads=args.threads, repeats=args.repeats, loop_steps=LOOP_STEPS),
                    "bytes": peer.model_bytes(d)}
    g32, g4 = genai["fp32"], genai["int4"]
    print(f"ONNX Runtime GenAI {onnxruntime_genai.__version__} (same weights, {seq}-token prompt): fp32 prefill "
          f"{g32['prefill_ms']:.1f} ms, decode {g32['decode_ms']:.2f} ms; int4 prefill {g4['prefill_ms']:.1f} ms, "
          f"decode {g4['decode_ms']:.2f} ms (in its loop {g4['loop_step_ms']:.2f} ms), bytes "
          f"{g4['bytes'] / g32['bytes']:.3f}x its fp32")
    print(f"ours / GenAI   fp32: prefill {f['prefill_ms'] / g32['prefill_ms']:.3f}, decode step "
          f"{f['decode_ms'] / g32['decode_ms']:.3f}, bytes {f['bytes'] / g32['bytes']:.3f}")
    for name in ("int4", "int4+gqa"):
        i4 = ours[name]
        print(f"ours / GenAI   {name:<8}: prefill {i4['prefill_ms'] / g4['prefill_ms']:.3f}, decode step "
              f"{i4['decode_ms'] / g4['decode_ms']:.3f} (first step after the prefill; target <= 1.0), "
              f"{i4['loop_step_ms'] / g4['loop_step_ms']:.3f} ({LOOP_STEPS}-token loops, host work included), "
              f"bytes {i4['bytes'] / g4['bytes']:.3f}")
    i4 = ours["int4"]
    print(f"targets: int4 bytes <= 0.2x fp32: {i4['bytes'] / f['bytes']:.3f}; int8 bytes <= 0.3x fp32: "
          f"{ours['int8']['bytes'] / f['bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
