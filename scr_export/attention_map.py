"""SCR.md pass 1 step 2 on the host, once for every runtime: from each diagnostic layer's head-mean attention rows to
the attention map A over each image's cells, reduced in float64.

Every runtime (the PyTorch reference, ONNX Runtime's diagnostic graph, llama.cpp's ``kq_soft_max`` hook, TensorRT)
hands over ``[L, T, T]`` per prompt: layer l's attention probabilities averaged over heads (queries × keys), at the
runtime's own precision. What follows is the same float64 arithmetic everywhere, so two runtimes' maps differ only
by their attention itself (audit S4: the reductions used to run at float64, float32 and mixed precision).
"""

from __future__ import annotations

import numpy as np

from .layout import ImageSpan, query_mask


def image_maps(layer_rows: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
               spans: list[ImageSpan]) -> list[np.ndarray | None]:
    """One prompt: ``A[i]`` over image i's cells (all its grids, span order) = the mean over diagnostic layers and
    over the text queries after image i of the attention to its cells; None when no text follows the image."""
    rows = np.asarray(layer_rows, np.float64)
    if rows.ndim != 3 or rows.shape[1] != rows.shape[2]:
        raise ValueError(f"expected [layers, T, T] head-mean attention rows, got {rows.shape}")
    mean = rows.mean(axis=0)  # [T, T], float64
    out: list[np.ndarray | None] = []
    for span in spans:
        q = query_mask(input_ids, attention_mask, spans, span)
        out.append(mean[q][:, span.start:span.end].mean(axis=0) if q.any() else None)
    return out


def batch_maps(layer_rows: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
               layouts: list[list[ImageSpan]]) -> list[list[np.ndarray | None]]:
    """``A[b][i]`` for a batch: ``layer_rows`` is [B, L, T, T]."""
    return [image_maps(layer_rows[b], input_ids[b], attention_mask[b], spans) for b, spans in enumerate(layouts)]
