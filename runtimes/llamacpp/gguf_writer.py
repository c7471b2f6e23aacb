"""Write a VLM's language decoder as a GGUF file with gguf-py (the decoder's tensors and hyper-parameters).

The vocabulary is the checkpoint's tokenizer as llama.cpp's converter writes it (``gguf_vocab``), so llama.cpp's own
tools run the file; scr-export's runner tokenises with ``tokenizer.json`` beside it and feeds ids. Text
architectures: Llama (LLaVA-1.5), Qwen2 (InternVL2), Qwen2-VL (M-RoPE) and Chameleon; the rotary layout follows llama.cpp's: Llama's Q/K rows are permuted to its adjacent-pair rotation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from scr_export.errors import SCRExportError

from .gguf_vocab import write_vocabulary

# family -> (GGUF architecture, whether Q/K rows are permuted for llama.cpp's NORM rope)
TEXT_ARCH = {"llava": ("llama", True), "internvl": ("qwen2", False), "qwen2_vl": ("qwen2vl", False),
             "chameleon": ("chameleon", True)}


def _permute_head_dims(w: np.ndarray) -> np.ndarray:
    """Per-head vectors [..., head_dim] in the same within-head order as permuted Q/K rows (Chameleon's q/k norms)."""
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(w.shape)


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> llama.cpp's adjacent-pair layout (rows of one projection)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_plan(family: Any, permute: bool) -> list[tuple[str, Any, Any]]:
    """(GGUF name, parameter, transform of its numpy array or None), in llama.cpp's order."""
    tc = family.text_config
    n_head = tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_head
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_head
    lm = family.model.model.language_model if hasattr(family.model.model, "language_model") else family.model.model
    params = dict(lm.named_parameters())

    def qk(heads):
        return (lambda w: _permute_qk(w, heads)) if permute else None

    def head_norm(heads):  # Chameleon: per-head LayerNorms, stored per head in llama.cpp
        def f(t):
            t = np.broadcast_to(t, (heads, head_dim)) if t.ndim == 1 else t
            return np.ascontiguousarray(_permute_head_dims(t) if permute else t)
        return f

    plan: list[tuple[str, Any, Any]] = [("token_embd.weight", params["embed_tokens.weight"], None)]
    for i in range(tc.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        plan += [(b + "attn_norm.weight", params[p + "input_layernorm.weight"], None),
                 (b + "attn_q.weight", params[p + "self_attn.q_proj.weight"], qk(n_head)),
                 (b + "attn_k.weight", params[p + "self_attn.k_proj.weight"], qk(n_kv)),
                 (b + "attn_v.weight", params[p + "self_attn.v_proj.weight"], None)]
        for name, gg, heads in (("q", "attn_q", n_head), ("k", "attn_k", n_kv), ("v", "attn_v", n_kv)):
            bias = params.get(p + f"self_attn.{name}_proj.bias")
            if bias is not None:
                plan.append((b + f"{gg}.bias", bias, qk(heads) if name in "qk" else None))
        for norm, gg, heads in (("q_norm", "attn_q_norm", n_head), ("k_norm", "attn_k_norm", n_kv)):
            for kind in ("weight", "bias"):
                t = params.get(p + f"self_attn.{norm}.{kind}")
                if t is not None:
                    plan.append((b + f"{gg}.{kind}", t, head_norm(heads)))
        plan += [(b + "attn_output.weight", params[p + "self_attn.o_proj.weight"], None),
                 (b + "ffn_norm.weight", params[p + "post_attention_layernorm.weight"], None),
                 (b + "ffn_gate.weight", params[p + "mlp.gate_proj.weight"], None),
                 (b + "ffn_up.weight", params[p + "mlp.up_proj.weight"], None),
                 (b + "ffn_down.weight", params[p + "mlp.down_proj.weight"], None)]
    plan += [("output_norm.weight", params["norm.weight"], None),
             ("output.weight", family.model.lm_head.weight, None)]
    return plan


def file_dtype(family: Any) -> str:
    """The float type the decoder's matrices are stored in: the checkpoint's (f16 / bf16 / f32)."""
    source = getattr(family, "weights", None)
    if source is None:
        return "float32"
    return {"float16": "float16", "bfloat16": "bfloat16"}.get(source.checkpoint.float_dtype, "float32")


def write_text_gguf(family: Any, path: str | Path, dtype: str = "float32", progress=None) -> dict[str, Any]:
    """Write the decoder of ``family`` to ``path``, matrices in ``dtype`` (float32, float16 or bfloat16; vectors
    such as norms and biases stay float32, as llama.cpp's converter writes them); returns what the manifest should
    record. A family loaded without weights (``load_vlm(weights=False)``) streams: each tensor is read from the
    checkpoint's safetensors, transformed and written before the next is read (gguf-py's tensor-info-then-data
    writing), so the peak holds one tensor."""
    import gguf
    import torch

    if family.name not in TEXT_ARCH:
        raise SCRExportError(f"the GGUF writer does not support the {family.display_name} text decoder yet",
                             f"supported: {', '.join(TEXT_ARCH)}")
    arch, permute = TEXT_ARCH[family.name]
    tc = family.text_config
    n_head = tc.num_attention_heads
    n_kv = getattr(tc, "num_key_value_heads", None) or n_head
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_head
    source = getattr(family, "weights", None)
    matrix = {"float32": (np.float32, None), "float16": (np.float16, None),
              "bfloat16": (np.uint16, gguf.GGMLQuantizationType.BF16)}[dtype]

    def as_matrix(name: str, param) -> bool:  # vectors and norms stay float32 (llama.cpp's converter does the same)
        return param.ndim >= 2 and "norm" not in name

    def read(name: str, param) -> np.ndarray:
        t = param.detach().cpu() if source is None else source.checkpoint.read(source.key(param))
        if not as_matrix(name, param) or dtype == "float32":
            return t.to(torch.float32).numpy()
        if dtype == "bfloat16":
            return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
        return t.to(torch.float16).numpy()

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"scr-export {family.display_name} decoder")
    w.add_context_length(int(getattr(tc, "max_position_embeddings", 4096)))
    w.add_embedding_length(tc.hidden_size)
    w.add_block_count(tc.num_hidden_layers)
    w.add_feed_forward_length(tc.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(tc.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    rope = getattr(tc, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))))
    if arch == "chameleon":
        w.add_swin_norm(bool(getattr(tc, "swin_norm", False)))
    if arch == "qwen2vl":  # M-RoPE sections (t, h, w) in rotary pairs, padded to llama.cpp's 4
        sections = list(rope.get("mrope_section") or [])
        w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])
    w.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                     "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    vocab = write_vocabulary(w, family.tokenizer, family.path, family.name, tc.vocab_size)

    plan = _tensor_plan(family, permute)
    for name, param, transform in plan:  # tensor infos first (shapes only), data after, one tensor at a time
        shape = tuple(param.shape)
        if transform is not None and len(shape) == 1 and ("q_norm" in name or "k_norm" in name):
            shape = ((n_head if "attn_q_norm" in name else n_kv), head_dim)
        np_dtype, raw = matrix if as_matrix(name, param) else (np.float32, None)
        n = int(np.prod(shape))
        w.add_tensor_info(name, shape, np.dtype(np_dtype), n * np.dtype(np_dtype).itemsize, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    iterator = plan
    if progress is not None:
        from tqdm import tqdm

        iterator = tqdm(plan, desc="GGUF tensors", unit="tensor", file=progress, leave=False)
    for name, param, transform in iterator:
        arr = read(name, param)
        if transform is not None:
            arr = transform(arr)
        w.write_tensor_data(np.ascontiguousarray(arr))
        del arr
    w.close()
    return {"architecture": arch, "qk_permuted": permute, "vocab": tc.vocab_size, "tokenizer": vocab,
            "dtype": dtype}
