"""SCR pass 2 in PyTorch: forward hooks that redistribute at every layer of the range (the reference)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import SCRConfig
from .families import VLMFamily
from .plan import SequencePlan


class Redistribution:
    """Context manager: while active, each decoder layer in ``config.layers`` has its output edited in place,

        h'[t] = scale[t]·h[t] + weight[t]·h[donor[t]]     (h: that layer's output before the edit)

    at the plan's active positions only. Hooks are registered with ``prepend=True`` (so transformers' own
    hidden-state capture sees the edited output) and are removed on exit, also on error.

    A plan of length T applies to the first T positions of a longer sequence (cache-less decoding re-runs the
    prompt); a shorter input while active is a KV-cached decode step, which must run with the plan inactive.
    """

    def __init__(self, family: VLMFamily, plan: SequencePlan, config: SCRConfig):
        import torch

        self.family = family
        self.plan = plan
        self.config = config.clamped(family.num_layers)
        self.active = True
        self.calls: dict[int, int] = {}
        self._handles: list[Any] = []
        b_idx, t_idx = np.nonzero(plan.active())
        self._b = torch.as_tensor(b_idx, dtype=torch.long)
        self._t = torch.as_tensor(t_idx, dtype=torch.long)
        self._donor = torch.as_tensor(plan.donor[b_idx, t_idx], dtype=torch.long)
        self._scale = torch.as_tensor(plan.scale[b_idx, t_idx], dtype=torch.float32)[:, None]
        self._weight = torch.as_tensor(plan.weight[b_idx, t_idx], dtype=torch.float32)[:, None]

    def _hook(self, layer_index: int):
        def hook(module, args, output):
            if not self.active or self._t.numel() == 0:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            batch, length = hidden.shape[0], hidden.shape[1]
            plan_batch, plan_length = self.plan.shape
            if batch != plan_batch:
                raise RuntimeError(f"SCR plan is for batch {plan_batch}, layer {layer_index} got batch {batch}")
            if length < plan_length:
                raise RuntimeError(f"layer {layer_index} got {length} positions but the SCR plan covers {plan_length}: "
                                   "a KV-cached decode step must run with the plan inactive (identity)")
            dev = hidden.device
            b, t, donor = self._b.to(dev), self._t.to(dev), self._donor.to(dev)
            own = hidden[b, t].float()            # advanced indexing copies: both reads see the pre-edit h
            from_donor = hidden[b, donor].float()
            new = self._scale.to(dev) * own + self._weight.to(dev) * from_donor
            hidden[b, t] = new.to(hidden.dtype)
            self.calls[layer_index] = self.calls.get(layer_index, 0) + 1
            return None  # edited in place; Chameleon's tuple output stays a tuple

        return hook

    def __enter__(self) -> "Redistribution":
        layers = self.family.decoder_layers()
        try:
            for i in self.config.layer_indices():
                self._handles.append(layers[i].register_forward_hook(self._hook(i), prepend=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
