"""InternVL2 (transformers' InternVL class): a 16×16 grid per 448 px tile, tiles row-major, thumbnail last."""

from __future__ import annotations

from typing import Any


from ..config import SCRConfig
from ..errors import InputError
from .base import VLMFamily, register_family, square_side


@register_family
class InternVLFamily(VLMFamily):
    name = "internvl"
    display_name = "InternVL2"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    prompt_template = "<|im_start|>user\n{images}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    scr_defaults = SCRConfig(layers=(0, 15), diag_layers=(8, 16))
    grid_rule = "one sqrt(image_seq_length)² grid per tile (crop_to_patches), tiles row-major, thumbnail last"

    @property
    def image_seq_length(self) -> int:
        if "image_seq_length" in self.processor_config:
            return int(self.processor_config["image_seq_length"])
        vc = self.config.vision_config
        side = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return int((side // patch) ** 2 * self.config.downsample_ratio ** 2)

    def process_images(self, images):
        out = dict(self.image_processor(images=images, return_tensors="pt"))
        if "num_patches" not in out:
            raise InputError("the image processor did not report num_patches (tiles per image)",
                             "use the InternVL (GotOcr2) image processor from the checkpoint")
        return out

    def expansion_attributes(self, image_inputs):
        return {"start_image_token": self.tokenizer.start_image_token, "end_image_token": self.tokenizer.end_image_token,
                "image_token": self.tokenizer.context_image_token, "image_seq_length": self.image_seq_length}

    def host_expansion(self) -> dict[str, Any]:
        a = self.expansion_attributes({})
        return {"start": a["start_image_token"], "context": a["image_token"], "end": a["end_image_token"],
                "image_seq_length": a["image_seq_length"]}

    def image_grids(self, image_index: int, extras: dict[str, Any]) -> list[tuple[int, int]]:
        tiles = extras.get("num_patches")
        if tiles is None or image_index >= len(tiles):
            raise InputError(f"no tile count for image {image_index}", "pass the image processor's num_patches")
        side = square_side(self.image_seq_length, "InternVL tile")
        return [(side, side)] * int(tiles[image_index])

    def expected_image_count(self, extras):
        tiles = extras.get("num_patches")
        return None if tiles is None else int(len(tiles))

    def forward_inputs(self, inputs):
        kw = super().forward_inputs(inputs)
        kw.pop("num_patches", None)
        return kw
