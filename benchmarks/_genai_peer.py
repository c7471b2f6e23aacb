"""The "peer" of the ONNX decoder benchmark: ONNX Runtime GenAI's model builder and runtime (onnxruntime-genai 0.18).

    python benchmarks/_genai_peer.py [--model small-llava] [--prompt-len 641] [--threads 2] [--repeats 5]

Three steps, each usable on its own by a benchmark script:
  1. save_language_model_checkpoint: the VLM's decoder (LlamaModel + lm_head) as a plain LlamaForCausalLM
     checkpoint, which is what the builder accepts (it knows no LLaVA);
  2. build_genai_model: run the builder on it (local files only, CPU EP, fp32 or int4) and read back which int4
     settings it chose by default (block size, accuracy level, what stayed unquantized);
  3. time_genai: median prefill time for prompt_len token ids, and one decode step after it, with the genai API.

Runtime semantics (onnxruntime-genai src/generators.cpp): Generator.append_tokens runs the model over the
appended ids (the prefill); the first generate_next_token after it only picks a token from those logits; the
second one runs the model on that one token (the decode step we time) and picks again.
Needs `pip install onnxruntime-genai==0.18.0` (not a project dependency: this is benchmark-only).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def save_language_model_checkpoint(family, out_dir) -> Path:
    """Write the VLM's language model + lm_head as a LlamaForCausalLM checkpoint (config, safetensors, tokenizer)."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    cfg = copy.deepcopy(family.text_config)
    if cfg.model_type != "llama":
        raise ValueError(f"only Llama decoders are handled here, not {cfg.model_type!r}")
    cfg.architectures = ["LlamaForCausalLM"]
    lm = transformers.LlamaForCausalLM(cfg)
    # Same tensors under the causal-LM names; strict=True fails on any missing or extra key.
    state = {f"model.{k}": v for k, v in family.model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = family.model.lm_head.weight
    with torch.no_grad():
        lm.load_state_dict(state, strict=True)
    lm.save_pretrained(out_dir)
    family.tokenizer.save_pretrained(out_dir)  # the builder loads a tokenizer from -i and copies it to the output
    return out_dir


def check_checkpoint(family, checkpoint_dir, n_tokens: int = 32) -> float:
    """Max |logits difference| between the saved LlamaForCausalLM and the VLM's own decoder on the same ids."""
    import torch
    import transformers

    lm = transformers.LlamaForCausalLM.from_pretrained(checkpoint_dir, attn_implementation="eager").eval()
    ids = torch.arange(n_tokens).remainder(family.text_config.vocab_size)[None]
    decoder = family.model.model.language_model
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
        ref = family.model.lm_head(decoder(inputs_embeds=decoder.embed_tokens(ids)).last_hidden_state)
    return float((ours - ref).abs().max())


def build_genai_model(checkpoint_dir, out_dir, precision: str) -> dict:
    """Run the builder (CPU EP, local checkpoint only) and report the quantization it applied."""
    if precision not in ("fp32", "int4"):
        raise ValueError("precision must be fp32 or int4")
    out_dir = Path(out_dir)
    # Offline: -i is a local directory, so nothing should be fetched; these make any attempt fail fast.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(out_dir.parent / f"{out_dir.name}-cache")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"builder failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"precision": precision, "build_s": time.perf_counter() - t0, **inspect_genai_model(out_dir)}


def inspect_genai_model(model_dir) -> dict:
    """What the builder wrote: quantized nodes and their attributes, float MatMuls left, session options."""
    import onnx

    model_dir = Path(model_dir)
    genai_cfg = json.loads((model_dir / "genai_config.json").read_text())
    decoder = genai_cfg["model"]["decoder"]
    graph = onnx.load(model_dir / decoder["filename"], load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = sorted({tuple((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute
                          if a.name in ("accuracy_level", "bits", "block_size")) for n in nbits})
    return {
        "matmulnbits_nodes": len(nbits),
        "matmulnbits_attrs": [dict(a) for a in attrs],  # one entry per distinct (accuracy_level, bits, block_size)
        "float_matmuls": [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")],
        "embedding_op": next((n.op_type for n in graph.node if "embed_tokens" in n.name and "Gather" in n.op_type),
                             None),
        "attention_op": next((n.op_type for n in graph.node if "attn" in n.name.lower() and n.domain == "com.microsoft"
                              and "Attention" in n.op_type), None),
        "session_options": decoder.get("session_options", {}),
        "genai_config": genai_cfg,
    }


def model_bytes(model_dir) -> int:
    """Total size of the model's .onnx and .onnx.data files."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.name.endswith((".onnx", ".onnx.data")))


def time_genai(model_dir, prompt_len: int, threads: int = 2, repeats: int = 5, warmup: int = 1,
               loop_steps: int = 64) -> dict:
    """Median prefill time for prompt_len token ids, median time of the first decode step after it, and the mean
    step of a ``loop_steps``-token greedy loop after it (ms): the same measures as ours."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    # Overlay onto genai_config.json: the decoder session's intra-op threads (1 inter-op thread, sequential).
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    vocab = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = (np.arange(prompt_len) % vocab).astype(np.int32)  # deterministic ids, no text
    prefill, decode, loop = [], [], []
    for i in range(warmup + repeats):
        params = og.GeneratorParams(model)
        # min_length > what we generate masks EOS, so greedy search never ends early on random weights.
        total = prompt_len + loop_steps + 8
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)  # allocates the KV cache: outside the timed region
        t0 = time.perf_counter()
        gen.append_tokens(ids)        # prefill: one model run over prompt_len ids
        t1 = time.perf_counter()
        gen.generate_next_token()     # greedy pick from the prefill logits: no model run
        t2 = time.perf_counter()
        gen.generate_next_token()     # one decode step: model run on 1 new token over the prompt_len cached, then pick
        t3 = time.perf_counter()
        for _ in range(loop_steps - 1):
            gen.generate_next_token()
        t4 = time.perf_counter()
        if i >= warmup:
            prefill.append((t1 - t0) * 1e3)
            decode.append((t3 - t2) * 1e3)
            loop.append((t4 - t2) * 1e3 / loop_steps)
        del gen, params
    del model, config
    return {"prefill_ms": statistics.median(prefill), "decode_ms": statistics.median(decode),
            "loop_step_ms": statistics.median(loop),
            "prefill_all_ms": prefill, "decode_all_ms": decode, "model_bytes": model_bytes(model_dir),
            "prompt_len": prompt_len, "threads": threads}


def main() -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llava")
    ap.add_argument("--prompt-len", type=int, default=641)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from scr_export.loading import load_vlm

    work = Path(args.work or tempfile.mkdtemp(prefix="genai-peer-"))
    t_start = time.perf_counter()
    fam = load_vlm(args.model)
    ckpt = save_language_model_checkpoint(fam, work / "llama")
    diff = check_checkpoint(fam, ckpt)
    print(f"[peer] checkpoint {ckpt}: max |logits - VLM decoder logits| = {diff:.3g}")
    if diff > 1e-5:
        raise SystemExit("the LlamaForCausalLM checkpoint does not reproduce the VLM's decoder")
    for precision in ("fp32", "int4"):
        info = build_genai_model(ckpt, work / f"genai-{precision}", precision)
        print(f"[peer] {precision}: built in {info['build_s']:.1f} s; MatMulNBits nodes {info['matmulnbits_nodes']} "
              f"{info['matmulnbits_attrs']}; float MatMuls {info['float_matmuls']}; embedding {info['embedding_op']}; "
              f"attention {info['attention_op']}; session_options {info['session_options']}")
        res = time_genai(work / f"genai-{precision}", args.prompt_len, args.threads, args.repeats)
        print(f"[peer] {precision}: prefill({res['prompt_len']}) {res['prefill_ms']:.2f} ms, "
              f"decode step {res['decode_ms']:.2f} ms (median of {args.repeats}, {res['threads']} threads), "
              f"model {res['model_bytes'] / 2**20:.2f} MiB; all prefill {[round(x, 2) for x in res['prefill_all_ms']]}"
              f", all decode {[round(x, 2) for x in res['decode_all_ms']]}")
    print(f"[peer] total {time.perf_counter() - t_start:.1f} s; files in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
