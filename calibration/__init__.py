"""Calibration: SCR-aware quantization calibration (data sources, the SCR-on reader, ranges and their cache, the
SCR-safe quantization recipes and the quantize step of `convert`), and credit entropy (SCR.md's diagnostic).

Modules import ONNX Runtime lazily where they can; ``credit_entropy`` needs only numpy (and torch for the norms).
"""

from .credit_entropy import credit_entropy, image_token_norms

__all__ = ["credit_entropy", "image_token_norms"]
