"""Calibration: credit entropy now; SCR-aware quantization calibration arrives with the quantized runtimes."""

from .credit_entropy import credit_entropy, image_token_norms

__all__ = ["credit_entropy", "image_token_norms"]
