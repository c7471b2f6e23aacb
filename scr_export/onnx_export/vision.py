"""Vision encoders (+ projector) and token embeddings as exportable modules, one wrapper per family.

Outputs feed the host-side merge (``merge.py``): image features per image token (LLaVA, InternVL, Qwen2-VL) or,
for Chameleon, the BPE ids of its VQ image tokens.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import SCRExportError
from ..families import VLMFamily
from .decoder import export_module


class LlavaVision(torch.nn.Module):
    """pixel_values [N,3,H,W] -> features [N, P, D] (CLIP layer ``vision_feature_layer``, CLS dropped, projected)."""

    def __init__(self, family: VLMFamily):
        super().__init__()
        inner = family.model.model
        self.tower, self.projector = inner.vision_tower, inner.multi_modal_projector
        self.layer = family.config.vision_feature_layer
        if not isinstance(self.layer, int):
            raise SCRExportError(f"vision_feature_layer={self.layer!r} (several layers) is not supported by the export",
                                 "use a LLaVA-1.5 checkpoint (a single feature layer, -2)")
        self.drop_cls = family.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.layer]
        if self.drop_cls:
            hidden = hidden[:, 1:]
        return self.projector(hidden)


class InternVLVision(torch.nn.Module):
    """pixel_values [tiles,3,448,448] -> features [tiles, 256, D] (pixel shuffle + projector)."""

    def __init__(self, family: VLMFamily):
        super().__init__()
        self.inner = family.model.model
        self.layer = family.config.vision_feature_layer
        self.strategy = family.config.vision_feature_select_strategy

    def forward(self, pixel_values):
        out = self.inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=self.layer,
                                            vision_feature_select_strategy=self.strategy)
        return out.pooler_output if hasattr(out, "pooler_output") else out


class Qwen2VLVision(torch.nn.Module):
    """One image: patches [N, 1176], rotary ids [N, 2], cu_seqlens [2] -> merged features [N/4, D]."""

    def __init__(self, family: VLMFamily):
        super().__init__()
        self.visual = family.model.model.visual

    def forward(self, pixel_values, vision_position_ids, cu_seqlens):
        out = self.visual(pixel_values, grid_thw=None, position_ids=vision_position_ids, cu_seqlens=cu_seqlens)
        return out.pooler_output if hasattr(out, "pooler_output") else out


class ChameleonVision(torch.nn.Module):
    """pixel_values [N,3,H,W] -> BPE ids of the VQ image tokens [N, 1024] (int64).

    Always float32, whatever the decoder's precision: the VQ encoder ends in a nearest-codebook lookup, and at
    float16 near-equidistant codes flip (measured: 1 of 64 cells on a flat-colour image), which changes the image
    tokens themselves; the VQ encoder is small, so a float32 copy costs little."""

    def __init__(self, family: VLMFamily):
        super().__init__()
        vq = family.model.model.vqmodel
        if getattr(family, "weights", None) is not None:
            self.vqmodel = vq.float()  # no weights in memory: same parameters, read as float32 when written
        else:
            self.vqmodel = vq if next(vq.parameters()).dtype == torch.float32 else _float32_vq(family)
        # the code -> BPE id table as a buffer (transformers indexes a CPU tensor built lazily, which export rejects)
        self.register_buffer("img2bpe", family.model.model.vocabulary_mapping.img2bpe_mapping_tensor.long(),
                             persistent=False)

    def forward(self, pixel_values):
        codes = self.vqmodel.encode(pixel_values.float(), return_dict=True).image_tokens
        return self.img2bpe[codes].view(pixel_values.shape[0], -1)


def _float32_vq(family: VLMFamily) -> torch.nn.Module:
    """Chameleon's VQ encoder in float32 with the checkpoint's own weights (a model loaded at float16 holds them
    rounded, and the rounding alone moves codes)."""
    from pathlib import Path

    from safetensors import safe_open

    vq = copy.deepcopy(family.model.model.vqmodel).float()
    prefix, state = "model.vqmodel.", {}
    for f in sorted(Path(family.path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.startswith(prefix):
                    state[k[len(prefix):]] = st.get_tensor(k).float()
    missing = [k for k in vq.state_dict() if k not in state]
    if missing:
        raise SCRExportError(f"the checkpoint's safetensors lack the VQ weights {missing[:3]} (of {len(missing)})",
                             "convert from a checkpoint saved with safetensors, or at --precision fp32")
    vq.load_state_dict(state, strict=False)
    return vq


class EmbedTokens(torch.nn.Module):
    """input_ids -> inputs_embeds in the decoder's float type (the table may be stored narrower: ``store``)."""

    def __init__(self, family: VLMFamily):
        super().__init__()
        self.embed = family.model.get_input_embeddings()
        self.out_dtype = family.model.dtype

    def forward(self, input_ids):
        return self.embed(input_ids).to(self.out_dtype)


VISION_WRAPPERS = {"llava": LlavaVision, "internvl": InternVLVision, "qwen2_vl": Qwen2VLVision,
                   "chameleon": ChameleonVision}


def qwen2_vl_vision_extras(family: VLMFamily, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side rotary ids and cu_seqlens for one Qwen2-VL image (what the visual module computes itself)."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    grid = torch.as_tensor(grid_thw, dtype=torch.long).reshape(1, 3)
    merge = family.config.vision_config.spatial_merge_size
    return get_vision_position_ids(grid, merge), get_vision_cu_seqlens(grid)


def vision_io(family: VLMFamily) -> tuple[list[str], list[str]]:
    if family.name == "qwen2_vl":
        return ["pixel_values", "vision_position_ids", "cu_seqlens"], ["image_features"]
    if family.name == "chameleon":
        return ["pixel_values"], ["image_token_ids"]
    return ["pixel_values"], ["image_features"]


def vision_sample(family: VLMFamily, image_inputs: dict[str, Any]) -> tuple:
    """Sample arguments from real processed images (two images/tiles where the batch axis is dynamic)."""
    # Chameleon's VQ graph is float32 at every precision (ChameleonVision)
    pv = image_inputs["pixel_values"].to(torch.float32 if family.name == "chameleon" else family.model.dtype)
    if family.name == "qwen2_vl":
        thw = image_inputs["image_grid_thw"][0]
        n = int(thw.prod())
        pos, cu = qwen2_vl_vision_extras(family, thw)
        return (pv[:n], pos, cu)
    if pv.shape[0] < 2:
        pv = torch.cat([pv, pv.flip(-1)], dim=0)
    return (pv,)


def export_vision(family: VLMFamily, image_inputs: dict[str, Any], path) -> None:
    from torch.export import Dim

    module = VISION_WRAPPERS[family.name](family).eval()
    args = vision_sample(family, image_inputs)
    names_in, names_out = vision_io(family)
    if family.name == "qwen2_vl":
        patches = Dim("patches", min=4)  # dynamic image size: patches = t*h*w, 4 per merged token
        shapes = ({0: patches}, {0: patches}, None)
    else:
        shapes = ({0: Dim("images", min=1, max=256)},)
    export_module(family, module, args, path, input_names=names_in, output_names=names_out, dynamo=True,
                  dynamic_shapes=shapes, optimize=True)


def export_embed_tokens(family: VLMFamily, path) -> None:
    from torch.export import Dim

    module = EmbedTokens(family).eval()
    ids = torch.ones(2, 5, dtype=torch.long)
    table = module.embed.weight
    source = getattr(family, "weights", None)
    stored = source.stored_dtype(table) if source is not None else table.dtype
    try:  # the table in the checkpoint's float type (a fp16 checkpoint's embeddings are not widened to fp32)
        if stored != table.dtype:
            module.embed.to(stored)  # in place: the same parameter (shared with a tied lm_head), restored below
        export_module(family, module, (ids,), path, input_names=["input_ids"], output_names=["inputs_embeds"],
                      dynamo=True, dynamic_shapes=({0: Dim("batch", min=1, max=1024), 1: Dim("seq", min=1)},),
                      optimize=True)
    finally:
        module.embed.to(module.out_dtype)
