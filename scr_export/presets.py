"""Tiny presets: random weights from real transformers configs (fixed seed), with a locally built processor.

A preset is materialised once as a ``save_pretrained`` directory in the cache and then loaded exactly like a real
checkpoint, so tests and demos walk the same code path as a user's local model directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PRESET_FORMAT = 7  # bump when a builder changes, so cached presets are rebuilt
SEED = 0

# The chat templates of the real checkpoints' tokenizers, in short (llama.cpp's tools read them from the GGUF):
# ChatML with vision markers (Qwen2-VL; InternVL2's Qwen2 chat), and llava-hf's "USER: <image>\n... ASSISTANT:".
CHATML_VISION = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ IMAGE }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': ' }}{% endif %}{% if message['content'] is string %}"
    "{{ message['content'] + ' ' }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}"
    "{{ part['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    family: str
    description: str
    build: Callable[[], tuple[Any, Any, Any, dict[str, Any]]]  # -> model, tokenizer, image_processor, processor_config
    trained: bool = False  # weights trained by examples/toy/train.py and shipped in scr_export/toy_models/<name>/


def _text(tok, hidden: int = 64, layers: int = 4, heads: int = 4, kv: int = 2, inter: int = 128, **kw):
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, **kw)


def _scr_ranges(layers: tuple[int, int], diag: tuple[int, int], k: int) -> dict[str, Any]:
    return {"layers": list(layers), "diag_layers": list(diag), "k": k}


def _llava(image_size: int, patch: int, vision: dict, text: dict, scr: dict, corpus: list[str] | None = None):
    import transformers as T

    from .tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer(["<image>"], {"image_token": "<image>"}, add_bos=True,  # LLaVA-1.5's Llama tokenizer
                               chat_template=LLAVA_CHAT, corpus=corpus, merges=TOY_MERGES if corpus else 0)
    cfg = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(image_size=image_size, patch_size=patch, **vision),
        text_config=T.LlamaConfig(**_text(tok, **text)), image_token_id=tok.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg.scr_export = scr
    model = T.LlavaForConditionalGeneration(cfg)
    ip = T.CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    pc = {"patch_size": patch, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    return model, tok, ip, pc


def build_tiny_llava():
    return _llava(64, 8, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=32), {}, _scr_ranges((0, 1), (1, 2), 4))


def build_small_llava():
    return _llava(336, 14, dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                projection_dim=256),
                  dict(hidden=512, layers=6, heads=8, kv=8, inter=1408), _scr_ranges((0, 2), (2, 4), 32))


TOY_MERGES = 160  # a trained preset's BPE: the shapes world's words and the chat template's as single tokens


def _toy_corpus(*template_text: str) -> list[str]:
    from .toyworld import text_corpus

    return text_corpus() + list(template_text) * 500


def build_toy_llava():
    """The architecture of the trained toy-llava (examples/toy/train.py): 96 px / patch 12 -> 8x8 grid, CLIP 3x64,
    a 4-layer Llama decoder of 128; a byte-level BPE learned from the world's text."""
    return _llava(96, 12, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                               projection_dim=64),
                  dict(hidden=128, layers=4, heads=4, kv=2, inter=256), _scr_ranges((0, 1), (1, 3), 8),
                  corpus=_toy_corpus("USER: ", " ASSISTANT:", " Yes", " No"))


def build_tiny_qwen2_vl():
    import transformers as T

    from .tokenizer import build_byte_tokenizer

    sp = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = build_byte_tokenizer(sp, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                    "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
                               chat_template=CHATML_VISION.replace("{{ IMAGE }}",
                                                                   "<|vision_start|><|image_pad|><|vision_end|>"))
    ids = tok.convert_tokens_to_ids
    cfg = T.Qwen2VLConfig(
        text_config=_text(tok, rms_norm_eps=1e-6,  # Qwen2-VL's own value
                          rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        # depth 3: llama.cpp's mmproj converter maps vision blocks by index and needs depth >= 3
        vision_config=dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    cfg.scr_export = _scr_ranges((0, 1), (1, 2), 4)
    model = T.Qwen2VLForConditionalGeneration(cfg)
    ip = T.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 64, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)
    return model, tok, ip, {}


def build_tiny_internvl():
    import transformers as T

    from .tokenizer import build_byte_tokenizer

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = build_byte_tokenizer(["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"], named,
                               chat_template=CHATML_VISION.replace("{{ IMAGE }}", "<image>\n"))
    vision = T.InternVLVisionConfig(image_size=96, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2)
    cfg = T.InternVLConfig(vision_config=vision, text_config=T.Qwen2Config(**_text(tok)),
                           image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5)
    cfg.scr_export = _scr_ranges((0, 1), (1, 2), 4)
    model = T.InternVLForConditionalGeneration(cfg)
    ip = T.GotOcr2ImageProcessorPil(size={"height": 96, "width": 96}, crop_to_patches=True, min_patches=1,
                                    max_patches=4)
    return model, tok, ip, {"image_seq_length": 36}


def build_tiny_chameleon():
    import transformers as T

    from .tokenizer import build_byte_tokenizer

    # The real layout: 8192 VQ codes whose BPE ids are 4..8195 (llama.cpp's chameleon graph masks exactly that range)
    n_codes = 8192
    letters = "ABCDEFGHIJ"
    code_tokens = ["IMGIMG" + "".join(letters[int(d)] for d in str(i)) + "Z" for i in range(n_codes)]
    tok = build_byte_tokenizer(["<image>", "<racm3:break>", "<eoss>"],
                               {"image_token": "<image>", "boi_token": "<racm3:break>", "eoi_token": "<eoss>"},
                               sep_token="<reserved08706>", leading_tokens=code_tokens, add_bos=True)
    vocab = tok.get_vocab()
    vocabulary_map = {t: vocab[t] for t in ["<image>", *code_tokens]}
    cfg = T.ChameleonConfig(**_text(tok), vocabulary_map=vocabulary_map,
                            vq_config=dict(embed_dim=16, num_embeddings=n_codes, resolution=32, base_channels=32,
                                           channel_multiplier=[1, 1, 1], latent_channels=16, num_res_blocks=1,
                                           attn_resolutions=[]))
    cfg.scr_export = _scr_ranges((0, 1), (1, 2), 4)
    model = T.ChameleonForConditionalGeneration(cfg)
    ip = T.ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tok, ip, {"image_seq_length": 64}


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("tiny-llava", "llava", "LLaVA-1.5 layout, 64 px / patch 8 -> 8×8 grid, 4-layer decoder", build_tiny_llava),
    Preset("tiny-qwen2-vl", "qwen2_vl", "Qwen2-VL layout, dynamic resolution, 2×2 merge, M-RoPE, 4 layers",
           build_tiny_qwen2_vl),
    Preset("tiny-internvl", "internvl", "InternVL layout, 96 px tiles -> 6×6 per tile + thumbnail, 4 layers",
           build_tiny_internvl),
    Preset("tiny-chameleon", "chameleon", "Chameleon layout, 32 px VQ -> 8×8 tokens, 4 layers", build_tiny_chameleon),
    Preset("toy-llava", "llava", "trained on the shapes world (examples/toy): 96 px / patch 12 -> 8×8 grid, 4×128 "
           "decoder", build_toy_llava, trained=True),
    Preset("small-llava", "llava", "LLaVA-1.5 geometry: 336 px, patch 14, 24×24 = 576 image tokens, 6×512 decoder",
           build_small_llava),
]}


def cache_root() -> Path:
    return Path(os.environ.get("SCR_EXPORT_CACHE") or Path.home() / ".cache" / "scr-export")


def preset_dir(name: str) -> Path:
    import transformers

    key = hashlib.sha256(f"{name}|{PRESET_FORMAT}|{transformers.__version__}".encode()).hexdigest()[:12]
    return cache_root() / "presets" / f"{name}-{key}"


def build_preset(name: str, out_dir: Path) -> None:
    """Build a preset with the fixed seed and write it as a checkpoint directory."""
    import torch

    preset = PRESETS[name]
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model, tok, ip, processor_config = preset.build()
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    ip.save_pretrained(out_dir)
    (out_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True))
    (out_dir / "scr_export_preset.json").write_text(json.dumps({"preset": name, "format": PRESET_FORMAT, "seed": SEED}))


TOY_MODELS = Path(__file__).resolve().parent / "toy_models"


def ensure_preset(name: str) -> Path:
    """The preset's checkpoint directory, building it atomically on first use (a trained toy preset: the shipped
    directory itself)."""
    if PRESETS[name].trained:
        shipped = TOY_MODELS / name
        if not (shipped / "config.json").is_file():
            from .errors import ModelLoadError

            raise ModelLoadError(f"the trained weights of {name} are not in this installation ({shipped})",
                                 f"train them: python examples/toy/train.py {name}")
        return shipped
    target = preset_dir(name)
    if (target / "scr_export_preset.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_preset(name, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / "scr_export_preset.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
