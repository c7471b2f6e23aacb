"""Qwen-VL (v1): its model code is remote code that is not part of transformers and cannot be obtained here."""

from __future__ import annotations

from ..errors import ModelLoadError

QWEN_VL_MODEL_TYPES = ("qwen",)


def refuse_qwen_vl(path: str) -> None:
    """Qwen-VL v1 is recognised, and refused honestly: there is no transformers class to run it with."""
    raise ModelLoadError(
        f"{path} is a Qwen-VL (v1) checkpoint; its model code ships as remote code (modeling_qwen.py, "
        "trust_remote_code), which is not part of transformers and is not supported by scr-export",
        "use Qwen2-VL (model_type qwen2_vl), which transformers supports natively; SCR.md's Qwen-VL defaults "
        "(layers 0..15, 16×16 resampler grid) are documented but not runnable here")
