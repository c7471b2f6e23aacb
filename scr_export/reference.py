"""The PyTorch reference pipeline: diagnostic → plan → prefill with SCR → greedy decoding (the parity oracle)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import SCRConfig
from .diagnostic import attention_maps
from .families import VLMFamily
from .memory_guard import VISION_SDPA_BYTES
from .plan import SequencePlan, plan_sequence
from .processing import VLMInputs
from .redistribution import Redistribution




@contextlib.contextmanager
def memory_efficient_vision(family: VLMFamily, inputs: VLMInputs):
    """A photo's vision attention through torch's scaled-dot-product attention (a flash kernel on the CPU: no
    [heads, N, N] matrix) where eager attention over one image's patches would need over 1 GiB. SCR's diagnostic
    reads the decoder's attention, never the vision tower's, so the tower's kernel is free to change; small inputs
    keep eager attention, the exported graph's arithmetic. (Qwen2-VL: 6250 patches, 16 heads: 5 GB eager.)"""
    vision = getattr(family.config, "vision_config", None)
    grid = inputs.tensors.get("image_grid_thw")
    heads = int(getattr(vision, "num_heads", 0) or 0)
    if vision is None or grid is None or not heads or getattr(vision, "_attn_implementation", None) != "eager":
        yield
        return
    patches = int(np.max(np.prod(np.asarray(grid), axis=-1)))
    if 2 * heads * patches**2 * 4 <= VISION_SDPA_BYTES:
        yield
        return
    vision._attn_implementation = "sdpa"
    try:
        yield
    finally:
        vision._attn_implementation = "eager"


def plan_for_inputs(family: VLMFamily, inputs: VLMInputs, config: SCRConfig,
                    maps: list[list[np.ndarray | None]] | None = None) -> SequencePlan:
    """Run the diagnostic pass (unless ``maps`` is given) and plan every image of the batch."""
    config = config.clamped(family.num_layers)
    if maps is None:
        inputs = inputs.to(family.device, family.model.dtype)
        with memory_efficient_vision(family, inputs):
            maps = attention_maps(family, inputs.tensors, inputs.layouts, config)
    plan = plan_sequence(inputs.layouts, maps, inputs.shape[1], config)
    plan.attention = maps  # kept for explain / validate
    return plan


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray                 # [B, N] generated ids (pad after EOS)
    texts: list[str]
    plan: SequencePlan
    logits: list[np.ndarray]           # per step (0 = prefill's last position): [B, V] float32
    prefill_logits: np.ndarray | None  # [B, T, V] when requested


def _pad_id(family: VLMFamily) -> int:
    tok = family.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def generate(family: VLMFamily, inputs: VLMInputs, config: SCRConfig | None = None, **kw: Any) -> GenerationResult:
    """Greedy decoding with SCR applied during the prefill (and, without a KV cache, at every re-run of the prompt).

    ``forced_tokens`` (teacher forcing, [B, N]) feeds the given tokens instead of the argmax, for parity checks.
    Keywords: ``scr``, ``max_new_tokens``, ``use_cache``, ``plan``, ``forced_tokens``, ``keep_prefill_logits``,
    ``stop_at_eos``.
    """
    with memory_efficient_vision(family, inputs):
        return _generate(family, inputs, config, **kw)


def _generate(family: VLMFamily, inputs: VLMInputs, config: SCRConfig | None = None, *, scr: bool = True,
              max_new_tokens: int = 32, use_cache: bool = True, plan: SequencePlan | None = None,
              forced_tokens: Sequence[Sequence[int]] | None = None, keep_prefill_logits: bool = False,
              stop_at_eos: bool = True) -> GenerationResult:
    import torch

    config = (config or family.scr_config()).clamped(family.num_layers)
    batch, length = inputs.shape
    if plan is None:
        plan = plan_for_inputs(family, inputs, config) if scr else SequencePlan.identity(batch, length)
    if not scr:
        plan = SequencePlan.identity(batch, length)
    eos = family.tokenizer.eos_token_id
    pad = _pad_id(family)
    model = family.model
    device = family.device
    inputs = inputs.to(device, model.dtype)
    tensors = dict(inputs.tensors)
    steps = max_new_tokens if forced_tokens is None else len(forced_tokens[0])
    generated: list[torch.Tensor] = []
    logits_per_step: list[np.ndarray] = []
    prefill_logits = None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    suppressed = torch.as_tensor(family.suppressed_token_ids(), dtype=torch.long, device=device)

    def pick(step_logits: torch.Tensor, step: int) -> torch.Tensor:
        if forced_tokens is not None:
            return torch.as_tensor([row[step] for row in forced_tokens], dtype=torch.long, device=device)
        masked = step_logits.clone()
        masked[:, suppressed] = float("-inf")  # never generate an image placeholder
        nxt = masked.argmax(-1)
        return torch.where(finished, torch.full_like(nxt, pad), nxt)

    with torch.no_grad(), Redistribution(family, plan, config) as redistribution:
        out = model(**family.forward_inputs(tensors), use_cache=use_cache)
        if keep_prefill_logits:
            prefill_logits = out.logits.float().cpu().numpy()
        past = out.past_key_values if use_cache else None
        last = out.logits[:, -1].float()
        for step in range(steps):
            logits_per_step.append(last.cpu().numpy())
            nxt = pick(last, step)
            generated.append(nxt)
            if eos is not None and stop_at_eos and forced_tokens is None:
                finished |= nxt == eos
                if bool(finished.all()):
                    break
            if step == steps - 1:
                break
            ids = torch.cat([tensors["input_ids"], nxt[:, None]], dim=1)
            mask = torch.cat([tensors["attention_mask"], torch.ones_like(nxt)[:, None]], dim=1)
            if use_cache:
                redistribution.active = False  # decode steps hold no image tokens: identity plan
                pos = family.decode_position_ids(inputs.tensors, mask)
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past,
                            use_cache=True)
                past = out.past_key_values
            else:
                # cache-less: the whole sequence again; the hook applies the plan to its first T positions
                out = model(**family.forward_inputs({**tensors, "input_ids": ids, "attention_mask": mask}),
                            use_cache=False)
            tensors["input_ids"], tensors["attention_mask"] = ids, mask
            last = out.logits[:, -1].float()
    tokens = torch.stack(generated, dim=1).cpu().numpy() if generated else np.zeros((batch, 0), np.int64)
    texts = [family.tokenizer.decode([t for t in row if t not in (pad, eos)], skip_special_tokens=False)
             for row in tokens.tolist()]
    return GenerationResult(tokens=tokens, texts=texts, plan=plan, logits=logits_per_step,
                            prefill_logits=prefill_logits)


def image_features_override(family: Any, features: np.ndarray):
    """Context manager: the family's vision tower returns ``features`` (e.g. llama.cpp's mmproj output) instead of
    its own, so a reference can be fed exactly the image embeddings the runtime used."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        visual = family.model.model.visual
        value = torch.from_numpy(np.ascontiguousarray(features))

        def hook(module, args, output):
            output.pooler_output = value.to(output.pooler_output.dtype)
            return output

        handle = visual.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    return ctx()


class TorchReference:
    """A PyTorch model behind the runners' ``generate`` interface, so one comparison serves every pair."""

    provider = "PyTorch (reference)"

    def __init__(self, family: Any, context=None):
        import contextlib

        self.family = family
        self.context = context or contextlib.nullcontext

    def generate(self, inputs, *, config=None, scr: bool = True, max_new_tokens: int = 32, plan=None,
                 stop_at_eos: bool = True, keep_prefill_logits: bool = False):
        with self.context():
            return generate(self.family, inputs, config, scr=scr, max_new_tokens=max_new_tokens, plan=plan,
                            stop_at_eos=stop_at_eos, keep_prefill_logits=keep_prefill_logits)

    def layer_states(self, inputs, *, scr: bool = True, plan=None, config=None) -> np.ndarray:
        with self.context():
            return layer_states(self.family, inputs, scr=scr, plan=plan, config=config)


def layer_states(family: VLMFamily, inputs: VLMInputs, *, scr: bool = True, plan: SequencePlan | None = None,
                 config: SCRConfig | None = None) -> np.ndarray:
    """The hidden state after every decoder layer at the prefill, [layers, T, D] float32 (batch row 0), after the
    SCR edit where a layer has one: what the runtimes' ``layer_states`` are compared with."""
    import torch

    config = (config or family.scr_config()).clamped(family.num_layers)
    batch, length = inputs.shape
    if not scr:
        plan = SequencePlan.identity(batch, length)
    elif plan is None:
        plan = plan_for_inputs(family, inputs, config)
    inputs = inputs.to(family.device, family.model.dtype)
    states: dict[int, np.ndarray] = {}
    handles = []
    with torch.no_grad(), Redistribution(family, plan, config):
        for i, layer in enumerate(family.decoder_layers()):  # registered after SCR's hooks: they see its edit
            def hook(module, args, output, i=i):
                h = output[0] if isinstance(output, tuple) else output
                states[i] = h[0].float().cpu().numpy()
            handles.append(layer.register_forward_hook(hook))
        try:
            family.model(**family.forward_inputs(dict(inputs.tensors)), use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return np.stack([states[i] for i in range(family.num_layers)])
