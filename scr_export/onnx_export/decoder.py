"""The language decoder as one exportable module: inputs_embeds + mask + positions + past KV -> logits + present KV."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SCRExportError
from ..families import VLMFamily


def language_model(family: VLMFamily) -> torch.nn.Module:
    """The text decoder (embeddings are fed in; the head is applied by the wrapper)."""
    inner = family.model.model
    return getattr(inner, "language_model", inner)


class DecoderWithPast(torch.nn.Module):
    """Exportable decoder: ``(inputs_embeds, attention_mask, position_ids, *past) -> (logits, *present)``.

    ``past`` is ``[k_0, v_0, k_1, v_1, ...]`` of shape [B, kv_heads, past_len, head_dim]; a prefill passes
    past_len = 0. Chameleon's head masks its image-token logits, as the family's forward does.
    """

    def __init__(self, family: VLMFamily):
        super().__init__()
        self.family_name = family.name
        self.text_config = family.text_config
        self.language_model = language_model(family)
        self.lm_head = family.model.lm_head
        self.num_layers = family.num_layers
        image_ids = None
        if family.name == "chameleon":
            image_ids = torch.as_tensor(family.model.model.vocabulary_mapping.image_tokens, dtype=torch.long)
        self.register_buffer("masked_logits", image_ids if image_ids is not None else torch.zeros(0, dtype=torch.long),
                             persistent=False)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state)
        if self.masked_logits.numel():
            logits = logits.index_fill(-1, self.masked_logits, torch.finfo(logits.dtype).min)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


def kv_shape(family: VLMFamily) -> tuple[int, int]:
    """(kv_heads, head_dim) of the decoder's cache."""
    tc = family.text_config
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return kv, head_dim


def io_names(family: VLMFamily) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(family.num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(family.num_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]


def sample_inputs(family: VLMFamily, batch: int = 2, seq: int = 5, past: int = 3, dtype=torch.float32):
    """Sample inputs with every dynamic axis >= 2 (the dynamo exporter specialises 0/1)."""
    kv, head_dim = kv_shape(family)
    hidden = family.text_config.hidden_size
    embeds = torch.randn(batch, seq, hidden, dtype=dtype)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, -1)
    if family.uses_mrope:
        pos = pos.unsqueeze(0).expand(3, -1, -1)
    pkv = []
    for _ in range(family.num_layers):
        pkv += [torch.randn(batch, kv, past, head_dim, dtype=dtype), torch.randn(batch, kv, past, head_dim, dtype=dtype)]
    return (embeds, mask, pos.contiguous(), *pkv)


def export_decoder(family: VLMFamily, path, *, dynamo: bool = True, opset: int | None = None) -> None:
    """Export the decoder with dynamic batch, sequence and past length."""
    wrapper = DecoderWithPast(family).eval()
    args = sample_inputs(family, dtype=family.model.dtype)
    inputs, outputs = io_names(family)
    if dynamo:
        from torch.export import Dim

        batch, seq, past, total = Dim("batch", min=1, max=1024), Dim("seq", min=1), Dim("past", min=0), Dim("total", min=1)
        pos_axes = {1: batch, 2: seq} if family.uses_mrope else {0: batch, 1: seq}
        # *past is one varargs tuple in the signature, so its shapes are one nested tuple
        shapes: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: total}, pos_axes,
                             tuple({0: batch, 2: past} for _ in range(2 * family.num_layers))]
        kw = dict(dynamo=True, dynamic_shapes=tuple(shapes), optimize=True)
        if opset is not None:
            kw["opset_version"] = opset
    else:
        axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": ({1: "batch", 2: "seq"} if family.uses_mrope else {0: "batch", 1: "seq"}),
                "logits": {0: "batch", 1: "seq"}}
        for name in inputs[3:]:
            axes[name] = {0: "batch", 2: "past"}
        for name in outputs[1:]:
            axes[name] = {0: "batch", 2: "total"}
        kw = dict(dynamo=False, dynamic_axes=axes, opset_version=opset or 18)
    if not dynamo and getattr(family, "weights", None) is not None:
        raise SCRExportError("the legacy exporter traces real weights; this model was loaded without them",
                             "use --exporter dynamo (the default), which streams the weights")
    export_module(family, wrapper, args, path, input_names=inputs, output_names=outputs, **kw)


def export_module(family: VLMFamily, module: torch.nn.Module, args: tuple, path, **kw) -> None:
    """``torch.onnx.export`` to ``path`` (IR version 10, weights in ``<name>.data``); for a family loaded without
    weights (``load_vlm(weights=False)``), traced on the meta device with the weights streamed from the checkpoint
    as the file is written (``weights.export_streaming``)."""
    source = getattr(family, "weights", None)
    if source is None:
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), **kw)
        return
    from graph_passes.io import save_model

    from .weights import export_streaming

    save_model(export_streaming(module, args, source, **kw), path)


def captured_decoder_inputs(family: VLMFamily, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The decoder inputs the PyTorch VLM builds for a prefill (merged image + text embeddings, mask, positions).

    The embeddings are what decoder layer 0 receives from the family's own forward, so they are the reference the
    exported vision / embedding graphs must reproduce; positions are the family's explicit position ids.
    """
    from ..partial_forward import run_through_layer

    seen: dict[str, torch.Tensor] = {}

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["inputs_embeds"] = hidden.detach().clone()

    handle = family.decoder_layers()[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run_through_layer(family, tensors, 0)
    finally:
        handle.remove()
    seen["attention_mask"] = tensors["attention_mask"]
    seen["position_ids"] = family.forward_inputs(tensors)["position_ids"]
    return seen
