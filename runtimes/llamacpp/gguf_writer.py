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


def write_text_gguf(family: Any, path: str | Path) -> dict[str, Any]:
    """Write the decoder of ``family`` (float32) to ``path``; returns what the manifest should record."""
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
    lm = family.model.model.language_model if hasattr(family.model.model, "language_model") else family.model.model
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in lm.state_dict().items()}
    head = family.model.lm_head.weight.detach().to(torch.float32).cpu().numpy()

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
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = write_vocabulary(w, family.tokenizer, family.path, family.name, tc.vocab_size)

    w.add_tensor("token_embd.weight", state["embed_tokens.weight"])
    for i in range(tc.num_hidden_layers):
        p = f"layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if permute:
            q, k = _permute_qk(q, n_head), _permute_qk(k, n_kv)
        w.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", q)
        w.add_tensor(f"blk.{i}.attn_k.weight", k)
        w.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        for name, gg in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
            bias = state.get(p + f"self_attn.{name}_proj.bias")
            if bias is not None:
                if permute and name in "qk":
                    bias = _permute_qk(bias, n_head if name == "q" else n_kv)
                w.add_tensor(f"blk.{i}.{gg}.bias", bias)
        for norm, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):  # Chameleon: per-head LayerNorms
            for kind in ("weight", "bias"):
                t = state.get(p + f"self_attn.{norm}.{kind}")
                if t is not None:
                    heads = n_head if norm == "q_norm" else n_kv
                    t = np.broadcast_to(t, (heads, head_dim)) if t.ndim == 1 else t
                    w.add_tensor(f"blk.{i}.{gg}.{kind}", np.ascontiguousarray(_permute_head_dims(t) if permute else t))
        w.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", state["norm.weight"])
    w.add_tensor("output.weight", head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "qk_permuted": permute, "vocab": tc.vocab_size, "tokenizer": vocab}
