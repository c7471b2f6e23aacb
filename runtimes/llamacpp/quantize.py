"""Quantize a GGUF with llama.cpp, and read a GGUF back as float weights (the dequantized reference)."""

from __future__ import annotations

import copy
import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from scr_export.errors import SCRExportError

# name -> llama_ftype (llama.h)
QUANT_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k_m": 15,
               "q5_k_m": 17, "q6_k": 18}
# which parity gate a quant type is judged by (DESIGN.md)
PRECISION_OF = {"f32": "fp32", "f16": "fp16", "q8_0": "int8", "q6_k": "int8", "q5_0": "4bit", "q5_1": "4bit",
                "q5_k_m": "4bit", "q4_0": "4bit", "q4_1": "4bit", "q4_k_m": "4bit"}


def quantize(src: Path, dst: Path, quant: str, threads: int = 2) -> None:
    import llama_cpp

    from .context import _silence_llama_logs

    _silence_llama_logs()
    if quant not in QUANT_TYPES:
        raise SCRExportError(f"quantization {quant!r} is not supported", f"use one of {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SCRExportError(f"llama.cpp failed to quantize to {quant} (rc={rc})", "try another --quant type")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the GGUF holds (k-quants fall back for rows not divisible by 256)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def dequantized_model(family: Any, gguf_path: Path, qk_permuted: bool) -> Any:
    """A copy of ``family`` whose decoder weights are the GGUF's, dequantized to float32."""
    import gguf
    import torch


    reader = gguf.GGUFReader(str(gguf_path))
    tc = family.text_config
    n_head = tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_head
    weights = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        weights[t.name] = arr.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))

    def unpermute(w, heads):
        # inverse of _permute_qk: the same reshape/swap read backwards
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    clone = copy.deepcopy(family)
    clone.model = copy.deepcopy(family.model)
    lm = clone.model.model.language_model if hasattr(clone.model.model, "language_model") else clone.model.model
    sd = {"embed_tokens.weight": weights["token_embd.weight"], "norm.weight": weights["output_norm.weight"]}
    for i in range(tc.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k = weights[b + "attn_q.weight"], weights[b + "attn_k.weight"]
        if qk_permuted:
            q, k = unpermute(q, n_head), unpermute(k, n_kv)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": weights[b + "attn_v.weight"],
                   p + "self_attn.o_proj.weight": weights[b + "attn_output.weight"],
                   p + "input_layernorm.weight": weights[b + "attn_norm.weight"],
                   p + "post_attention_layernorm.weight": weights[b + "ffn_norm.weight"],
                   p + "mlp.gate_proj.weight": weights[b + "ffn_gate.weight"],
                   p + "mlp.up_proj.weight": weights[b + "ffn_up.weight"],
                   p + "mlp.down_proj.weight": weights[b + "ffn_down.weight"]})
        for norm, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            for kind in ("weight", "bias"):
                if b + f"{gg}.{kind}" in weights:
                    t = weights[b + f"{gg}.{kind}"]
                    if qk_permuted:  # undo the within-head order of the permuted Q/K rows
                        hd = t.shape[-1]
                        t = t.reshape(*t.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(t.shape)
                    sd[p + f"self_attn.{norm}.{kind}"] = t
        for name, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
            if b + f"{gg}.bias" in weights:
                bias = weights[b + f"{gg}.bias"]
                if qk_permuted and name in "qk":
                    bias = unpermute(bias, n_head if name == "q" else n_kv)
                sd[p + f"self_attn.{name}_proj.bias"] = bias
    missing, unexpected = lm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                             strict=False)
    missing = [m for m in missing if not m.startswith("vqmodel.")]  # Chameleon's VQ tokenizer is not in the GGUF
    if unexpected or any(not m.endswith("rotary_emb.inv_freq") for m in missing):
        raise SCRExportError(f"the GGUF does not map onto the decoder (missing {missing}, unexpected {unexpected})",
                             "convert again")
    clone.model.lm_head.weight.data = torch.from_numpy(np.ascontiguousarray(weights["output.weight"]))
    return clone
