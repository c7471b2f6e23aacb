"""Tokenisation with the ``tokenizers`` library alone, from the ``tokenizer.json`` and ``tokenizer_config.json`` the
converter writes (transformers' ``save_pretrained``: the same pre-tokeniser, model and added tokens as the
transformers tokenizer, so the ids are identical). Batches are left-padded with the configured pad token."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class HostTokenizer:
    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise InputError(f"{d} has no tokenizer.json", "convert the model again (the converter writes it)")
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        # a tokenizer.json saved after transformers padded a batch carries that padding (and may carry a
        # truncation): this class pads itself, on the left, and never truncates
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        cfg_file = d / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.eos_token = _token(self.config.get("eos_token"))
        self.pad_token = _token(self.config.get("pad_token")) or self.eos_token
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)

    def get_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids and attention_mask [B, T], int64, left-padded; special tokens as the tokenizer's post-processor
        adds them (BOS for Llama tokenizers), as the families' processors do."""
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        length = max(len(r) for r in rows)
        if len(set(map(len, rows))) > 1 and self.pad_token_id is None:
            raise InputError("the tokenizer has no pad token, so prompts of different lengths cannot be batched",
                             "run the prompts one at a time")
        ids = np.full((len(rows), length), self.pad_token_id if self.pad_token_id is not None else 0, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for b, r in enumerate(rows):
            ids[b, length - len(r):] = r
            mask[b, length - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
