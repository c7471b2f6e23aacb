"""Chameleon: one 32×32 grid of VQ tokens per image (tiny presets: resolution / 2^(levels−1))."""

from __future__ import annotations

from typing import Any

from ..config import SCRConfig
from .base import VLMFamily, center_crop_square, register_family, square_side


@register_family
class ChameleonFamily(VLMFamily):
    name = "chameleon"
    display_name = "Chameleon"
    model_types = ("chameleon",)
    model_class = "ChameleonForConditionalGeneration"
    processor_class = "ChameleonProcessor"
    layers_path = "model.layers"
    prompt_template = "{images}{prompt}"
    scr_defaults = SCRConfig(layers=(0, 15), diag_layers=(8, 16))  # Chameleon 7B (32 layers, hidden 4096)
    scr_defaults_30b = SCRConfig(layers=(0, 20), diag_layers=(8, 16))  # Chameleon 30B (SCR.md table)
    GEOMETRY_30B = (48, 8192)  # (decoder layers, hidden size) of Chameleon 30B; 7B is (32, 4096)
    grid_rule = "VQ latent (resolution / 2^(levels-1))², row-major, one grid per image"

    def default_scr_config(self) -> SCRConfig:
        """SCR.md: layers 0..20 for Chameleon 30B (recognised by its depth and width), 0..15 for 7B and others."""
        tc = self.text_config
        geometry = (int(tc.num_hidden_layers), int(tc.hidden_size))
        return self.scr_defaults_30b if geometry == self.GEOMETRY_30B else self.scr_defaults

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def grid_side(self) -> int:
        vq = self.config.vq_config
        return vq.resolution // 2 ** (len(vq.channel_multiplier) - 1)

    @property
    def image_seq_length(self) -> int:
        return int(self.processor_config.get("image_seq_length", self.grid_side ** 2))

    def format_prompt(self, prompt: str, num_images: int) -> str:
        # ChameleonProcessor ends a chat prompt with the separator token
        text = super().format_prompt(prompt, num_images)
        sep = self.tokenizer.sep_token
        return text + sep if sep else text

    def expansion_attributes(self, image_inputs):
        return {"image_start_token": "<racm3:break>", "image_end_token": "<eoss>", "image_token": self.placeholder,
                "image_seq_length": self.image_seq_length}

    def host_expansion(self) -> dict[str, Any]:
        return {"image_token": self.placeholder, "image_seq_length": self.image_seq_length}

    def host_settings(self) -> dict[str, Any]:
        return {**super().host_settings(), "suffix": self.tokenizer.sep_token or ""}

    def display_image(self, image):
        return center_crop_square(image)

    def image_grids(self, image_index: int, extras: dict[str, Any]) -> list[tuple[int, int]]:
        side = square_side(self.image_seq_length, "Chameleon image")
        return [(side, side)]

    def expected_image_count(self, extras):
        pv = extras.get("pixel_values")
        return None if pv is None else int(pv.shape[0])
