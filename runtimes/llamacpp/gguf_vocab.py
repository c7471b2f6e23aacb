"""The checkpoint's tokenizer as a GGUF vocabulary, written the way llama.cpp's own converter writes it.

With it, llama.cpp's own tools (llama-cli, llama-server, llama-mtmd-cli, llama-cpp-python's ``Llama``) tokenise
text exactly as the checkpoint's tokenizer does; scr-export's runner does not depend on it (it tokenises with
``tokenizer.json`` and feeds ids and embeddings). Three kinds, chosen from the files, as the converter chooses:

* ``tokenizer.model`` (SentencePiece: LLaVA-1.5's Llama-2 tokenizer) -> model ``llama`` with scores and BYTE pieces;
* ``tokenizer.json`` BPE with byte fallback (the same tokenizer without ``tokenizer.model``) -> model ``llama``;
* ``tokenizer.json`` byte-level BPE (Qwen2-VL, InternVL2's Qwen2, Chameleon, the tiny presets) -> model ``gpt2``
  with the merges and the family's pre-tokenizer name.

Special ids, ``add_bos_token`` and the chat template come from gguf-py's ``SpecialVocab`` (the converter's reader).
``check_tokenizer`` tokenises a fixed set of strings with llama.cpp from the GGUF alone and with the checkpoint's
tokenizer; the converter records the result in the manifest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from scr_export.errors import SCRExportError

# llama.cpp's pre-tokenizer names (llama-vocab.cpp) for each family's byte-level BPE text model, as its converter
# picks them; a vocabulary without merges (the presets) is split into single bytes whatever the regex, so it gets
# "qwen2", the name whose detokeniser round-trips text byte for byte.
PRE_TOKENIZER = {"qwen2_vl": "qwen2", "internvl": "qwen2", "chameleon": "chameleon", "llava": "llama-bpe"}
NO_MERGES_PRE = "qwen2"
# gguf-py drops an empty array and llama.cpp refuses a gpt2 vocabulary without the merges key: one merge of two
# multi-character special tokens, which byte-level pieces can never form, keeps the key without changing any result.
_NEVER_FIRING_MERGE = "<s> </s>"

# What tokenisation is checked on: ASCII, accents, CJK, emoji, digits, whitespace runs, plus every added token of
# the tokenizer inside text (the chat template's and the image placeholders).
PROBES = (
    "hello",
    "Hello world! What is in the image? Answer in one sentence.",
    "Café crème, naïve façade — Ünïcödé àccents.",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🚗🐱👍🏽 and flags 🇫🇷",
    "numbers 1234567 3.14159 and  double  spaces\n\nnew lines\ttabs",
    "  leading spaces and trailing  ",
)


def _token_type(gguf: Any, added: Any, text: str) -> Any:
    if added.special or re.fullmatch(r"<\|.*\|>", text):  # the converter's does_token_look_special, in short
        return gguf.TokenType.CONTROL
    return gguf.TokenType.USER_DEFINED


def write_vocabulary(writer: Any, tokenizer: Any, checkpoint: Path, family: str, vocab_size: int) -> dict[str, Any]:
    """Add the tokenizer to a ``gguf.GGUFWriter``; returns what the manifest should record about it.

    ``tokenizer``: the checkpoint's transformers tokenizer; ``checkpoint``: its directory; ``vocab_size``: the
    embedding rows (ids beyond the tokenizer become unused ``[PAD{i}]`` entries, as in the converter).
    """
    import logging

    import gguf

    # gguf-py's reader warns about the pair template of every Llama tokenizer ("<s> $A <s> $B"), which llama.cpp
    # never uses; the probe check below is what says whether the vocabulary is right
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    checkpoint = Path(checkpoint)
    spm = checkpoint / "tokenizer.model"
    tj_path = checkpoint / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else None
    model = (tj or {}).get("model", {})
    if spm.is_file() or (model.get("type") == "BPE" and model.get("byte_fallback")):
        kind, tokens, scores, types = _llama_tokens(gguf, tokenizer, checkpoint, spm.is_file(), vocab_size)
        model_name = "llama"
        writer.add_tokenizer_model(model_name)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(checkpoint, load_merges=False, n_vocab=len(tokens))
        pre = "default"
    elif model.get("type") == "BPE":
        tokens, types = _bpe_tokens(gguf, tokenizer, vocab_size)
        special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=len(tokens))
        pre = PRE_TOKENIZER.get(family, "default") if special.merges else NO_MERGES_PRE
        kind = "byte-level BPE" + ("" if special.merges else " (no merges)")
        model_name = "gpt2"
        writer.add_tokenizer_model(model_name)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if not special.merges:
            special.merges = [_NEVER_FIRING_MERGE]
    else:
        raise SCRExportError(f"{checkpoint} has no tokenizer llama.cpp can represent (need tokenizer.model or a BPE "
                             "tokenizer.json)", "convert a checkpoint saved with its tokenizer files")
    # the converter's eot: the chat turn's end token (<|im_end|>), so llama.cpp's tools stop a chat reply there
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if eot is not None and "eot" not in special.special_token_ids:
        special.special_token_ids["eot"] = eot
    template = _chat_template(tokenizer, checkpoint)
    if special.chat_template is None and template is not None:
        special.chat_template = template
    special.add_to_gguf(writer, quiet=True)
    return {"model": model_name, "pre": pre,
            "kind": kind, "merges": len(special.merges) if model_name == "gpt2" else 0,
            "chat_template": special.chat_template is not None,
            "special_ids": dict(special.special_token_ids)}


def _chat_template(tokenizer: Any, checkpoint: Path) -> str | None:
    """The tokenizer's chat template, or the processor's (``chat_template.json`` / ``.jinja`` beside it)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return template
    for name in ("chat_template.jinja", "chat_template.json"):
        p = checkpoint / name
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def _bpe_tokens(gguf: Any, tokenizer: Any, vocab_size: int) -> tuple[list[str], list[Any]]:
    """Byte-level BPE: the vocabulary's strings as they are (ByteLevel characters), types as the converter gives."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(_token_type(gguf, added[i], reverse[i]))
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _llama_tokens(gguf: Any, tokenizer: Any, checkpoint: Path, use_spm: bool, vocab_size: int):
    """SentencePiece (``tokenizer.model``) or its ``tokenizer.json`` twin, through gguf-py's own readers, then the
    tokens transformers added after the model's pieces (``<image>``: saved in tokenizer.json, not added_tokens.json,
    so gguf-py's reader does not see them)."""
    if use_spm:
        try:
            vocab = gguf.SentencePieceVocab(checkpoint)
        except (ImportError, RuntimeError):
            raise SCRExportError("this checkpoint's tokenizer is SentencePiece (tokenizer.model) and the sentencepiece "
                                 "package is missing", "pip install 'scr-export[export]' (it installs sentencepiece), "
                                 "then convert again") from None
        kind = "SentencePiece"
    else:
        vocab = gguf.LlamaHfVocab(checkpoint)
        kind = "BPE with byte fallback"
    tokens, scores, types = [], [], []
    for text, score, typ in vocab.all_tokens():
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        scores.append(float(score))
        types.append(typ)
    added = tokenizer.added_tokens_decoder
    for i in range(len(tokens), max([vocab_size, *(j + 1 for j in added)])):
        if i in added:
            tokens.append(added[i].content)
            types.append(_token_type(gguf, added[i], added[i].content))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        scores.append(-1000.0)
    if len(tokens) > vocab_size:
        raise SCRExportError(f"the tokenizer has {len(tokens)} tokens but the decoder embeds {vocab_size}",
                             "the checkpoint's tokenizer and config disagree: fix the checkpoint")
    return kind, tokens, scores, types


def probe_strings(tokenizer: Any) -> list[str]:
    """PROBES plus a chat turn that holds every added token of the tokenizer (special and image placeholders)."""
    added = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())]
    added = [t for t in added if not t.startswith("IMGIMG")][:64]
    return [*PROBES, "<|im_start|>user\n" + " text ".join(added) + " done<|im_end|>\n", " ".join(added)]


def check_tokenizer(gguf_path: str | Path, tokenizer: Any, strings: list[str] | None = None) -> dict[str, Any]:
    """Tokenise ``strings`` with llama.cpp (the GGUF's vocabulary alone, special tokens parsed, BOS as the GGUF
    says) and with ``tokenizer`` (special tokens added as it adds them); returns counts and the first mismatch."""
    from llama_cpp import Llama

    from .context import _silence_llama_logs

    _silence_llama_logs()
    strings = probe_strings(tokenizer) if strings is None else strings
    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        mismatches = []
        for s in strings:
            ours = llm.tokenize(s.encode("utf-8"), add_bos=True, special=True)
            theirs = list(tokenizer(s, add_special_tokens=True)["input_ids"])
            if ours != theirs:
                mismatches.append({"text": s, "llama_cpp": ours[:32], "checkpoint": theirs[:32]})
    finally:
        llm.close()
    return {"strings": len(strings), "identical": len(strings) - len(mismatches),
            "first_mismatch": mismatches[0] if mismatches else None}
