"""Known differences between llama.cpp (as pinned) and transformers, mirrored in the engine-error reference.

Each quirk is applied only to the "dequantized" reference (what llama.cpp is expected to compute), never to the
float reference (what the user's model is), so the float comparison keeps showing the difference.
"""

from __future__ import annotations

from typing import Any

# llama-cpp-python 0.3.36 (llama.cpp 0c1e57098): llama_model_qwen2vl::load_arch_hparams never reads
# attention.layer_norm_rms_epsilon, so every RMSNorm of a qwen2vl decoder runs with eps = 0.
QWEN2VL_RMS_EPS_ZERO = "llama.cpp loads Qwen2-VL decoders with RMS-norm epsilon 0 (upstream bug in 0.3.36)"


# llama.cpp's chameleon graph writes its image-token mask (ids 4..8195) with ggml_set_1d on the flattened logits,
# which reaches only the first output row; the runner re-applies the mask to every row (Chameleon's definition).
CHAMELEON_MASK_FIRST_ROW = ("llama.cpp masks Chameleon's image-token logits in the first output row only; "
                            "scr-export masks every row after decoding")


def quirks_for(architecture: str) -> list[str]:
    return {"qwen2vl": [QWEN2VL_RMS_EPS_ZERO], "chameleon": [CHAMELEON_MASK_FIRST_ROW]}.get(architecture, [])


def fix_logits(architecture: str, logits, masked_ids=None):
    """Runtime corrections of llama.cpp's outputs (in place); returns the array."""
    import numpy as np

    if architecture == "chameleon" and masked_ids is not None and len(masked_ids):
        logits[..., masked_ids] = np.finfo(np.float32).min
    return logits


def apply_quirks(family: Any, architecture: str) -> list[str]:
    """Make ``family``'s decoder compute what llama.cpp computes; returns the quirks applied."""
    applied = [q for q in quirks_for(architecture) if q == QWEN2VL_RMS_EPS_ZERO]
    if QWEN2VL_RMS_EPS_ZERO in applied:
        layers = family.decoder_layers()
        norms = [family.model.model.language_model.norm]
        for layer in layers:
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            norm.variance_epsilon = 0.0
    return applied
