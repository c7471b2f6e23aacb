"""Token embeddings from the GGUF's own table: the rows a prompt needs, dequantized as llama.cpp dequantizes them.

A GGUF directory embeds its tokens with ``token_embd.weight`` of the GGUF file (memory-mapped by gguf-py's reader;
quantized with the rest at Q8_0 / Q4_0 / ...), not with a float copy beside it: the values are the ones llama.cpp
itself would use, and the table is stored once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class GGUFTokenTable:
    """``table(ids)`` -> float32 embeddings [*ids.shape, hidden] from ``token_embd.weight``."""

    def __init__(self, path: str | Path):
        import gguf

        reader = gguf.GGUFReader(str(path))
        tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if tensor is None:
            from scr_export.errors import SCRExportError

            raise SCRExportError(f"{path} has no token_embd.weight", "convert the model again with --to gguf")
        self._data = tensor.data  # memory-mapped: rows [vocab, bytes or values per row]
        self._type = tensor.tensor_type
        self.vocab, self.hidden = int(tensor.shape[1]), int(tensor.shape[0])
        self._reader = reader  # keeps the map open

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        import gguf

        ids = np.asarray(ids)
        flat = np.clip(ids.reshape(-1), 0, self.vocab - 1)
        rows = np.asarray(self._data[flat])
        out = gguf.quants.dequantize(rows, self._type).astype(np.float32, copy=False)
        return out.reshape(*ids.shape, self.hidden)
