"""SCR pass 1 in PyTorch: the attention map A over each image's cells (SCR.md, pass 1 step 2)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import SCRConfig
from .families import VLMFamily
from .attention_map import batch_maps
from .layout import ImageSpan, query_mask
from .partial_forward import run_through_layer

__all__ = ["attention_maps", "head_mean_attention", "query_mask"]


def head_mean_attention(family: VLMFamily, tensors: dict[str, Any], config: SCRConfig) -> np.ndarray:
    """Each diagnostic layer's attention probabilities averaged over heads: [B, L, T, T] float64 (queries × keys).

    Runs the decoder without SCR only up to the last diagnostic layer (eager attention).
    """
    import torch

    cfg = config.clamped(family.num_layers)
    layers = family.decoder_layers()
    diag = list(cfg.diag_layer_indices())
    rows: list[torch.Tensor] = []
    handles = []

    def capture(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the attention module returned no probabilities; load the model with "
                               "attn_implementation='eager'")
        rows.append(weights.detach().double().mean(dim=1))

    try:
        for i in diag:
            handles.append(layers[i].self_attn.register_forward_hook(capture))
        run_through_layer(family, tensors, diag[-1])
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows, dim=1).cpu().numpy()


def attention_maps(family: VLMFamily, tensors: dict[str, Any], layouts: list[list[ImageSpan]],
                   config: SCRConfig) -> list[list[np.ndarray | None]]:
    """``A[b][i]``: image i of row b's cell scores (all its grids, span order), or None if no text follows it; the
    layers and queries reduced by ``scr_export.attention_map`` (float64), as for every runtime."""
    rows = head_mean_attention(family, tensors, config)
    ids = tensors["input_ids"].cpu().numpy()
    am = tensors["attention_mask"].cpu().numpy()
    return batch_maps(rows, ids, am, layouts)
