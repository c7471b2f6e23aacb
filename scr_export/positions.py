"""Position ids on the host, in numpy, once per request: what the runners feed the decoder (no torch on the run
path). The PyTorch reference keeps the model's own functions; tests hold the two equal.

- 1-D positions: ``cumsum(mask) - 1``, 0 on left padding; the first generated token's position is ``sum(mask)``
  and every later one adds 1.
- Qwen2-VL's M-RoPE (``mrope``): text runs count up on all three rows; an image of ``t × h × w`` merged patches gets
  (t, row, column) offsets from the position where it starts, and the text after it resumes at that start plus
  ``max(h, w)`` (transformers' ``get_rope_index``). Generated tokens continue 1-D from ``sum(mask) + delta`` with
  ``delta = max position + 1 - valid tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def text_positions(attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prefill positions [B, T], the first generated token's [B, 1])."""
    mask = np.asarray(attention_mask, np.int64)
    return np.maximum(np.cumsum(mask, -1) - 1, 0), mask.sum(-1, keepdims=True)


def mrope(input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: Sequence[Sequence[int]],
          image_token_id: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(prefill positions [3, B, T], the first generated token's [3, B, 1]) for Qwen2-VL."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    batch, length = ids.shape
    positions = np.zeros((3, batch, length), np.int64)
    grids = iter([tuple(int(v) for v in g) for g in np.asarray(image_grid_thw).reshape(-1, 3)])
    deltas = np.zeros((batch, 1), np.int64)
    for b in range(batch):
        is_image = ids[b][mask[b]] == image_token_id
        rows, current, start = [], 0, 0
        while start < len(is_image):
            end = start
            while end < len(is_image) and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                rows.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
            else:
                t, h, w = next(grids)
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
                rows.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
                current += max(h, w) // merge
            start = end
        llm = np.concatenate(rows, 1) if rows else np.zeros((3, 0), np.int64)
        positions[:, b, mask[b]] = llm
        deltas[b, 0] = (llm.max() + 1 if llm.size else 0) - mask[b].sum()
    nxt = mask.sum(-1, keepdims=True) + deltas
    return positions, np.broadcast_to(nxt[None], (3, batch, 1)).copy()


def vision_positions(grid_thw: Sequence[int], merge: int) -> np.ndarray:
    """Qwen2-VL vision rotary ids of one image, [t·h·w, 2] (row, column), laid out block-major over the merge×merge
    blocks (transformers' ``get_vision_position_ids``)."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], -1), (t, 1)).astype(np.int64)


def vision_cu_seqlens(grid_thw: Sequence[int]) -> np.ndarray:
    """Qwen2-VL's vision attention segments of one image: one per frame, [t + 1] int32 cumulative lengths."""
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(3))
    return np.concatenate([[0], np.cumsum(np.full(t, h * w))]).astype(np.int32)
