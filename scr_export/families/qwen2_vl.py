"""Qwen2-VL: one (H/28)×(W/28) grid per image after the 2×2 merge, from ``image_grid_thw``; 3-row M-RoPE."""

from __future__ import annotations

from typing import Any


from ..config import SCRConfig
from ..errors import InputError
from .base import VLMFamily, register_family, text_positions


@register_family
class Qwen2VLFamily(VLMFamily):
    name = "qwen2_vl"
    display_name = "Qwen2-VL"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt_template = "<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    scr_defaults = SCRConfig(layers=(0, 15), diag_layers=(8, 16))
    grid_rule = "image_grid_thw (t, h, w) -> (h/merge)×(w/merge) per image, row-major"
    uses_mrope = True

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def host_expansion(self):
        return {"merge_size": self.merge}

    def expand_placeholders(self, text, image_inputs, first_image):
        # The family processor expands <|image_pad|> (inside the vision start/end markers).
        text = text.replace(self.placeholder, "\0")
        pad = "<|image_pad|>"
        from .base import _as_numpy

        image_inputs = _as_numpy(image_inputs)
        out, idx = [], first_image
        for i, piece in enumerate(text.split("\0")):
            if i:
                import transformers

                fake = type("P", (), {})()
                fake.image_token = pad
                fake.image_processor = self.image_processor
                out.append("<|vision_start|>" + transformers.Qwen2VLProcessor.replace_image_token(fake, image_inputs, idx)
                           + "<|vision_end|>")
                idx += 1
            out.append(piece)
        return "".join(out), idx

    def image_grids(self, image_index: int, extras: dict[str, Any]) -> list[tuple[int, int]]:
        thw = extras.get("image_grid_thw")
        if thw is None or image_index >= len(thw):
            raise InputError(f"no image_grid_thw for image {image_index}",
                             "pass the image processor's image_grid_thw with the input ids")
        t, h, w = (int(v) for v in thw[image_index])
        if t != 1 or h % self.merge or w % self.merge:
            raise InputError(f"image {image_index} has grid_thw {(t, h, w)}, not a single frame divisible by the merge",
                             "use still images processed by the Qwen2-VL image processor")
        return [(h // self.merge, w // self.merge)]

    def expected_image_count(self, extras):
        thw = extras.get("image_grid_thw")
        return None if thw is None else int(len(thw))

    def mm_token_type_ids(self, input_ids):
        import torch

        return (input_ids == self.image_token_id).to(torch.int32)

    def rope_index(self, inputs):
        """3-row M-RoPE positions [3, B, T] and per-row deltas [B, 1] (the model's own ``get_rope_index``)."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        # Qwen2VLModel.get_rope_index reads only the config, so it also serves deployed runtimes without weights
        host = _RopeHost(self.config)
        return Qwen2VLModel.get_rope_index(
            host, inputs["input_ids"], mm_token_type_ids=self.mm_token_type_ids(inputs["input_ids"]),
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])

    def forward_inputs(self, inputs):
        position_ids, _ = self.rope_index(inputs)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                "pixel_values": inputs.get("pixel_values"), "image_grid_thw": inputs.get("image_grid_thw"),
                "mm_token_type_ids": self.mm_token_type_ids(inputs["input_ids"]), "position_ids": position_ids}

    def host_positions(self, arrays):
        from ..positions import mrope

        return mrope(arrays["input_ids"], arrays["attention_mask"], arrays["image_grid_thw"], self.image_token_id,
                     self.merge)

    def decode_position_ids(self, inputs, attention_mask):
        _, deltas = self.rope_index(inputs)
        pos = text_positions(attention_mask)[:, -1:] + deltas.to(attention_mask.device)
        return pos.unsqueeze(0).expand(3, -1, -1)


class _RopeHost:
    """The part of Qwen2VLModel that ``get_rope_index`` uses: its config and vision position helper."""

    def __init__(self, config):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        self.config = config
        self.get_vision_position_ids = Qwen2VLModel.get_vision_position_ids.__get__(self)
