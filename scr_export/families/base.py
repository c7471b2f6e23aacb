"""The declarative family adapter: what differs between VLM families, and the shared logic around it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..config import SCRConfig
from ..errors import InputError
from ..layout import Grid, ImageSpan, token_runs

if TYPE_CHECKING:
    import torch

FAMILIES: dict[str, type["VLMFamily"]] = {}


def register_family(cls: type["VLMFamily"]) -> type["VLMFamily"]:
    """Class decorator: make a family known to model loading and to the CLI."""
    if cls.name in FAMILIES:
        raise ValueError(f"family {cls.name!r} registered twice")
    FAMILIES[cls.name] = cls
    return cls


class VLMFamily:
    """One VLM family. Subclasses set class attributes; override methods only where the family truly differs."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]            # config.json "model_type" values of this family
    model_class: ClassVar[str]                        # transformers class that loads it
    layers_path: ClassVar[str] = "model.language_model.layers"
    placeholder: ClassVar[str] = "<image>"           # what a prompt writes where an image goes
    prompt_template: ClassVar[str] = "{prompt}"       # "{images}" marks where image placeholders go
    processor_class: ClassVar[str]                    # the family's transformers processor (token expansion rules)
    scr_defaults: ClassVar[SCRConfig] = SCRConfig(layers=(0, 15), diag_layers=(8, 16))
    grid_rule: ClassVar[str] = ""                     # one line for `inspect`
    uses_mrope: ClassVar[bool] = False
    weights: Any = None  # a WeightSource when loaded without weights (load_vlm(weights=False)): streaming export
    # how the runtime that uses this adapter runs the vision attention (memory_guard.py): the PyTorch reference
    # switches to torch's SDPA above a size; a converted directory's host adapter says what its graph does
    vision_attention: str = "sdpa-above"

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, processor_config: dict[str, Any]):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor_config = dict(processor_config)

    # -- structure ------------------------------------------------------------------------------------------------
    def decoder_layers(self):
        obj = self.model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def text_config(self):
        return getattr(self.config, "text_config", self.config)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def scr_config(self, **overrides: Any) -> SCRConfig:
        """The family default, overridden by a preset's own ranges (config attribute) and by ``overrides``."""
        base = self.default_scr_config()
        stored = getattr(self.config, "scr_export", None)
        if isinstance(stored, dict):
            base = SCRConfig.from_dict({**base.to_dict(), **stored})
        if overrides:
            base = base.replace(**overrides)
        return base.clamped(self.num_layers)

    def default_scr_config(self) -> SCRConfig:
        """The paper's defaults for this model (SCR.md table); families whose sizes differ override this."""
        return self.scr_defaults

    # -- prompts and processing -----------------------------------------------------------------------------------
    def format_prompt(self, prompt: str, num_images: int) -> str:
        """Put ``num_images`` placeholders into the family's prompt format unless the prompt already has them."""
        from ..hostproc.encode import format_prompt

        return format_prompt(prompt, num_images, self.prompt_template, self.placeholder)

    def display_image(self, image):
        """The region of ``image`` the grid covers, for pictures (default: the whole image)."""
        return image

    def process_images(self, images: list) -> dict[str, Any]:
        """Run the family's own image processor."""
        return dict(self.image_processor(images=images, return_tensors="pt"))

    def host_expansion(self) -> dict[str, Any]:
        """Keyword arguments of this family's ``scr_export.hostproc.prompts`` expansion."""
        raise NotImplementedError(f"{self.display_name} has no torch-free image-token expansion yet")

    def host_settings(self) -> dict[str, Any]:
        """What the torch-free pre-processing (``scr_export.hostproc.HostSettings``) needs, JSON-ready: recorded
        in every converted directory's manifest ("host")."""
        import json

        return json.loads(json.dumps({
            "family": self.name, "prompt_template": self.prompt_template, "placeholder": self.placeholder,
            "expansion": self.host_expansion(), "image_processor": self.image_processor.to_dict(),
            "suffix": ""}, default=int))

    def expansion_attributes(self, image_inputs: dict[str, Any]) -> dict[str, Any]:
        """Attributes the family processor's ``replace_image_token`` reads from ``self``."""
        return {}

    def expand_placeholders(self, text: str, image_inputs: dict[str, Any], first_image: int) -> tuple[str, int]:
        """Replace each placeholder by the family processor's own image-token expansion."""
        import transformers

        proc_cls = getattr(transformers, self.processor_class)
        fake_self = _Attrs(tokenizer=self.tokenizer, image_processor=self.image_processor,
                           **self.expansion_attributes(image_inputs))
        image_inputs = _as_numpy(image_inputs)
        pieces = text.split(self.placeholder)
        out = [pieces[0]]
        idx = first_image
        for piece in pieces[1:]:
            out.append(proc_cls.replace_image_token(fake_self, image_inputs, idx))
            out.append(piece)
            idx += 1
        return "".join(out), idx

    # -- image spans and grids ------------------------------------------------------------------------------------
    def suppressed_token_ids(self) -> list[int]:
        """Tokens greedy decoding never emits: image placeholders (they would need pixels)."""
        return [self.image_token_id]

    def image_token_mask(self, input_ids: np.ndarray) -> np.ndarray:
        return np.asarray(input_ids) == self.image_token_id

    def image_grids(self, image_index: int, extras: dict[str, Any]) -> list[tuple[int, int]]:
        """The (rows, cols) of each grid of image ``image_index`` (flat over the batch), in span order."""
        raise NotImplementedError

    def image_layout(self, input_ids: np.ndarray, extras: dict[str, Any]) -> list[list[ImageSpan]]:
        """Image spans and grids for a [B, T] batch of input ids; checks each span against the expected geometry."""
        input_ids = np.asarray(input_ids)
        layouts: list[list[ImageSpan]] = []
        image_index = 0
        for b, row in enumerate(input_ids):
            spans: list[ImageSpan] = []
            for start, end in token_runs(self.image_token_mask(row)):
                pos = start
                while pos < end:  # adjacent images can form one run of image tokens
                    grids_rc = self.image_grids(image_index, extras)
                    size = sum(r * c for r, c in grids_rc)
                    if pos + size > end:
                        raise InputError(
                            f"row {b}: image {image_index} needs {size} image tokens but the run at {start}..{end - 1} "
                            f"has only {end - pos} left",
                            "build inputs with scr-export (or the family processor) so placeholders are expanded to the "
                            "model's image-token count")
                    grids, g_start = [], pos
                    for r, c in grids_rc:
                        grids.append(Grid(g_start, r, c))
                        g_start += r * c
                    spans.append(ImageSpan(pos, pos + size, tuple(grids)))
                    pos += size
                    image_index += 1
            layouts.append(spans)
        expected = self.expected_image_count(extras)
        if expected is not None and image_index != expected:
            raise InputError(f"the input has image tokens for {image_index} images but {expected} images were processed",
                             "give one placeholder per image")
        return layouts

    def expected_image_count(self, extras: dict[str, Any]) -> int | None:
        return None

    # -- model inputs ---------------------------------------------------------------------------------------------
    def forward_inputs(self, inputs: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        """Keyword arguments of the model's forward for a full (prefill or cache-less) pass."""

        kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in inputs}
        kw["position_ids"] = text_positions(inputs["attention_mask"])
        return kw

    def host_positions(self, arrays: dict) -> tuple:
        """Numpy, once per request (``scr_export.positions``): the prefill position ids and the first generated
        token's; each later decode step adds 1. ``arrays``: input_ids, attention_mask and the family's extras."""
        from ..positions import text_positions as host_text_positions

        return host_text_positions(arrays["attention_mask"])

    def decode_position_ids(self, inputs: dict[str, "torch.Tensor"], attention_mask: "torch.Tensor"):
        """Position ids of the newest token for a KV-cached decode step; ``attention_mask`` covers all tokens."""
        return text_positions(attention_mask)[:, -1:]


def center_crop_square(image):
    """The centre square of ``image`` at native resolution: the region a resize-shortest-edge + centre-crop
    processor (CLIP, Chameleon) shows the model."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def text_positions(attention_mask):
    """1-D positions that skip left padding: the ``cumsum(mask) - 1`` rule, 0 on padding."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def square_side(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise InputError(f"{what}: {tokens} tokens per image do not form a square grid",
                         "check the checkpoint's image size / patch size / image_seq_length")
    return side


def _as_numpy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in values.items()}


class _Attrs:
    """Stands in for ``self`` when calling a family processor's token-expansion method."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)
