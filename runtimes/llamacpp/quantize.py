"""Quantize a GGUF with llama.cpp, and read a GGUF back as float weights (the dequantized reference)."""

from __future__ import annotations

import copy as copy_module
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


def dequantized_model(family: Any, gguf_path: Path, qk_permuted: bool, copy: bool = True) -> Any:
    """A copy of ``family`` whose decoder weights are the GGUF's, dequantized to float32 (``copy=False``: ``family``
    itself, its decoder weights replaced: one float model in memory instead of two). Tensors are dequantized one at
    a time, straight into the parameter they replace."""
    import gguf
    import torch

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    tc = family.text_config
    n_head = tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_head

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        return arr.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))

    def unpermute(heads):  # inverse of _permute_qk: the same reshape/swap read backwards
        return lambda w: w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def head_order(t):  # undo the within-head order of the permuted Q/K rows (Chameleon's q/k norms)
        hd = t.shape[-1]
        return t.reshape(*t.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(t.shape)

    if copy:
        clone = copy_module.deepcopy(family)
        clone.model = copy_module.deepcopy(family.model)
    else:
        clone = family
    lm = clone.model.model.language_model if hasattr(clone.model.model, "language_model") else clone.model.model
    plan: list[tuple[str, str, Any]] = [("embed_tokens.weight", "token_embd.weight", None),
                                        ("norm.weight", "output_norm.weight", None)]
    for i in range(tc.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        plan += [(p + "self_attn.q_proj.weight", b + "attn_q.weight", unpermute(n_head) if qk_permuted else None),
                 (p + "self_attn.k_proj.weight", b + "attn_k.weight", unpermute(n_kv) if qk_permuted else None),
                 (p + "self_attn.v_proj.weight", b + "attn_v.weight", None),
                 (p + "self_attn.o_proj.weight", b + "attn_output.weight", None),
                 (p + "input_layernorm.weight", b + "attn_norm.weight", None),
                 (p + "post_attention_layernorm.weight", b + "ffn_norm.weight", None),
                 (p + "mlp.gate_proj.weight", b + "ffn_gate.weight", None),
                 (p + "mlp.up_proj.weight", b + "ffn_up.weight", None),
                 (p + "mlp.down_proj.weight", b + "ffn_down.weight", None)]
        for norm, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
            for kind in ("weight", "bias"):
                if b + f"{gg}.{kind}" in tensors:
                    plan.append((p + f"self_attn.{norm}.{kind}", b + f"{gg}.{kind}",
                                 head_order if qk_permuted else None))
        for name, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
            if b + f"{gg}.bias" in tensors:
                heads = n_head if name == "q" else n_kv
                plan.append((p + f"self_attn.{name}_proj.bias", b + f"{gg}.bias",
                             unpermute(heads) if qk_permuted and name in "qk" else None))
    params = dict(lm.named_parameters())
    missing = [g for _, g, _ in plan if g not in tensors]
    unknown = [n for n, _, _ in plan if n not in params]
    if missing or unknown:
        raise SCRExportError(f"the GGUF does not map onto the decoder (missing {missing}, unexpected {unknown})",
                             "convert again")
    with torch.no_grad():
        for name, gguf_name, transform in plan:
            arr = read(gguf_name)
            if transform is not None:
                arr = transform(arr)
            param = params[name]
            if tuple(param.shape) != arr.shape:
                arr = arr.reshape(param.shape)  # per-head norms stored [heads, head_dim] where the model has them so
            param.data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        clone.model.lm_head.weight.data = torch.from_numpy(np.ascontiguousarray(read("output.weight")))
    return clone
