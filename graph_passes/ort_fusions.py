"""ONNX Runtime's own transformer fusions on the GroupQueryAttention decoder (ONNX Runtime only).

The exported RMSNorm is seven nodes (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul), and the residual Add before
it one more: at a decode step of a small model these elementwise nodes cost as much as the matmuls. ONNX Runtime's
transformer optimizer (``onnxruntime.transformers.optimizer``, the tool its model builder relies on) fuses them into
``SimplifiedLayerNormalization`` and ``SkipSimplifiedLayerNormalization``. Only those fusions run here: attention is
already GroupQueryAttention (``group_query_attention.py``), rotary embeddings stay as exported (M-RoPE has no fused
op), and the SCR nodes are custom-domain nodes the optimizer leaves alone. A residual Add whose sum feeds an SCR node
keeps that sum as the fused node's extra output, so the SCR nodes see exactly the tensor they saw before.

The weights are not loaded: the rewritten graph keeps referring to the source's external data file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

FUSED = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def fuse_norms(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Rewrite ``src`` into ``dst`` (same directory: the external data stays ``src``'s) with the norm fusions;
    returns the fused-operator counts."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    src, dst = Path(src), Path(dst)
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError("fuse_norms writes beside its source: the weights file is shared, not copied")
    model = onnx.load(str(src), load_external_data=False)
    options = FusionOptions("gpt2")
    for flag in ("enable_attention", "enable_rotary_embeddings", "enable_gelu", "enable_bias_gelu",
                 "enable_gelu_approximation", "enable_qordered_matmul", "enable_bias_skip_layer_norm",
                 "enable_embed_layer_norm"):
        if hasattr(options, flag):
            setattr(options, flag, False)
    cwd = os.getcwd()
    os.chdir(src.parent)  # anything that peeks at a constant resolves the external data from here
    logging.disable(logging.WARNING)  # its per-fusion log lines and "model producer not matched": we choose
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimize_model(model, model_type="gpt2", num_heads=num_heads, hidden_size=hidden_size,
                                       opt_level=0, optimization_options=options, only_onnxruntime=False)
    finally:
        os.chdir(cwd)
        logging.disable(logging.NOTSET)
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if k in FUSED}
    onnx.save(optimized.model, str(dst))
    return stats
