"""LLaVA-1.5: one 24×24 grid per image (336 px, patch 14, CLS dropped)."""

from __future__ import annotations

from typing import Any

from ..config import SCRConfig
from .base import VLMFamily, center_crop_square, register_family


@register_family
class LlavaFamily(VLMFamily):
    name = "llava"
    display_name = "LLaVA-1.5"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    prompt_template = "USER: {images}\n{prompt} ASSISTANT:"
    scr_defaults = SCRConfig(layers=(0, 11), diag_layers=(8, 16))
    grid_rule = "(image_size/patch)² patches without CLS, one row-major grid per image"

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    def expansion_attributes(self, image_inputs: dict[str, Any]) -> dict[str, Any]:
        pc = self.processor_config
        return {"image_token": self.placeholder,
                "patch_size": pc.get("patch_size", self.config.vision_config.patch_size),
                "vision_feature_select_strategy": pc.get("vision_feature_select_strategy",
                                                         self.config.vision_feature_select_strategy),
                "num_additional_image_tokens": pc.get("num_additional_image_tokens", 1)}

    def host_expansion(self) -> dict[str, Any]:
        return self.expansion_attributes({})

    def display_image(self, image):
        return center_crop_square(image)

    def image_grids(self, image_index: int, extras: dict[str, Any]) -> list[tuple[int, int]]:
        return [(self.grid_side, self.grid_side)]

    def expected_image_count(self, extras: dict[str, Any]) -> int | None:
        pv = extras.get("pixel_values")
        return None if pv is None else int(pv.shape[0])
