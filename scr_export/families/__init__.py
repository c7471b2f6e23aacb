"""Model families: one declarative adapter per VLM family (explicit imports, no magic registry)."""

from .base import FAMILIES, VLMFamily, register_family
from .chameleon import ChameleonFamily
from .internvl import InternVLFamily
from .llava import LlavaFamily
from .qwen2_vl import Qwen2VLFamily
from .qwen_vl import QWEN_VL_MODEL_TYPES, refuse_qwen_vl

__all__ = ["FAMILIES", "VLMFamily", "register_family", "LlavaFamily", "Qwen2VLFamily", "InternVLFamily",
           "ChameleonFamily", "QWEN_VL_MODEL_TYPES", "refuse_qwen_vl", "family_for_model_type"]


def family_for_model_type(model_type: str) -> type[VLMFamily] | None:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None
