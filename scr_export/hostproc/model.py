"""A converted directory's model on the host, without torch or transformers: the family adapter over the config
numbers the converter recorded (manifest ``model_config``), the tokenizer from ``tokenizer.json``, and ``encode``
from this package. This is what the runners (ONNX Runtime, llama.cpp, TensorRT) build their inputs with; the
PyTorch reference keeps transformers' processors, and tests hold the two equal."""

from __future__ import annotations

import json
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..families import FAMILIES, VLMFamily
from ..memory_guard import check as check_memory
from ..processing import VLMInputs
from .encode import HostSettings, encode
from .tokenize import HostTokenizer

# The config attributes the family adapters read on a run (image-token geometry, positions, limits): recorded by
# the converter where the checkpoint's config has them. ``text_config`` is the family's text config (Chameleon's is
# the top-level config), so the record always has one.
CONFIG_FIELDS = (
    "image_token_id", "downsample_ratio", "vision_feature_select_strategy",
    "text_config.num_hidden_layers", "text_config.max_position_embeddings", "text_config.hidden_size",
    "vision_config.image_size", "vision_config.patch_size", "vision_config.spatial_merge_size",
    "vq_config.resolution", "vq_config.channel_multiplier",
    "vision_config.num_heads", "vision_config.embed_dim", "text_config.num_attention_heads",  # memory_guard.py
)


def host_config(family: VLMFamily) -> dict[str, Any]:
    """The ``CONFIG_FIELDS`` of a loaded family's config, JSON-ready (what ``convert`` writes to the manifest)."""
    record: dict[str, Any] = {}
    for field in CONFIG_FIELDS:
        head, _, tail = field.rpartition(".")
        obj = family.text_config if head == "text_config" else getattr(family.config, head, None) if head \
            else family.config
        value = getattr(obj, tail, None) if obj is not None else None
        if value is None:
            continue
        value = list(value) if isinstance(value, (list, tuple)) else value
        (record.setdefault(head, {}) if head else record)[tail] = value
    return json.loads(json.dumps(record, default=int))


def _namespace(record: dict[str, Any]) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in record.items()})


class _ConfigOnly:
    """Stands in for the torch model: the adapters read only its config on the host."""

    def __init__(self, config: types.SimpleNamespace):
        self.config = config
        self.dtype = None


class HostModel:
    """The family adapter, settings and tokenizer of a converted directory; ``encode`` gives numpy inputs."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any]):
        self.dir = Path(directory)
        missing = [k for k in ("host", "model_config") if k not in manifest]
        if missing:
            raise ModelLoadError(f"{self.dir} was converted by an earlier scr-export: its manifest lacks "
                                 f"{', '.join(missing)} (what the torch-free runtime reads)",
                                 "convert the model again with this version")
        name = manifest["family"]
        if name not in FAMILIES:
            raise ModelLoadError(f"{self.dir} holds a {name!r} model, a family this scr-export does not know",
                                 f"known families: {', '.join(FAMILIES)}; upgrade scr-export or convert again")
        self.settings = HostSettings(**manifest["host"])
        self.tokenizer = HostTokenizer(self.dir)
        pc_file = self.dir / "processor_config.json"
        processor_config = json.loads(pc_file.read_text()) if pc_file.is_file() else {}
        self.family = FAMILIES[name](_ConfigOnly(_namespace(manifest["model_config"])), self.tokenizer, None,
                                     processor_config)
        self.family.source, self.family.path, self.family.preset = str(self.dir), self.dir, None
        self.family.vision_attention = "eager"  # until a runner says it runs the fused vision graph

    def encode(self, images: Sequence[Sequence[Any]], prompts: Sequence[str], text_only: bool = False) -> VLMInputs:
        """``images[b]`` (PIL images) of ``prompts[b]`` -> numpy input ids, mask, pixels, extras and the image
        layouts (left padding), exactly as ``scr_export.processing.encode`` gives them with transformers.
        ``text_only``: prompts without images are allowed (no pixels, empty layouts)."""
        out = encode(images, prompts, self.settings, self.tokenizer, text_only=text_only)
        check_memory(self.family, out)  # refused with the numbers before any graph runs
        texts = out.pop("texts")
        layouts = self.family.image_layout(out["input_ids"], out)
        return VLMInputs(tensors=out, layouts=layouts, texts=texts, images=[list(row) for row in images])
