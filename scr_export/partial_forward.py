"""Run a VLM's decoder only as far as one layer: the diagnostic pass and credit entropy need no more."""

from __future__ import annotations

from typing import Any


class _ReachedLastLayer(Exception):
    pass


def run_through_layer(family: Any, tensors: dict[str, Any], last_layer: int) -> None:
    """Forward the full model input (vision included), stopping after decoder layer ``last_layer``.

    Observers are the caller's hooks; nothing is returned. No SCR, no KV cache.
    """
    import torch

    def stop(module, args, output):
        raise _ReachedLastLayer

    handle = family.decoder_layers()[last_layer].register_forward_hook(stop)
    try:
        with torch.no_grad():
            family.model(**family.forward_inputs(tensors), use_cache=False)
    except _ReachedLastLayer:
        pass
    finally:
        handle.remove()
