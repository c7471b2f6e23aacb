"""Refuse an input whose working memory would exceed the machine's, with the numbers and the fix, before it runs.

A photo at Qwen2-VL's own pixel limits is thousands of vision patches, and its vision encoder attends over all of
them at once: 16 heads x 6250^2 float32 scores is 2.5 GB in eager attention, and the probabilities as much again.
The estimate here is the largest transient of one request: the vision encoder's attention over one image's patches,
or the decoder's eager attention over the prompt (prefill), scores and probabilities in float32. How the vision
attention runs is the family's ``vision_attention``: ``"eager"`` (the N x N matrices: the TensorRT kit and ONNX
directories converted before the fused vision graph), ``"fused"`` (ONNX Runtime's MultiHeadAttention, a flash
kernel: q, k, v and the output, linear in N) or ``"sdpa-above"`` (the PyTorch reference: eager up to
``VISION_SDPA_BYTES``, torch's flash SDPA above). It is compared with what the
operating system says is available (``MemAvailable``), or with ``SCR_EXPORT_MEMORY_GB`` where set (a cap for a
shared machine, and how the tests provoke a refusal). Torch-free.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import InputError

FLOAT = 4          # bytes: ONNX Runtime's and PyTorch's attention scores are float32 on the CPU
COPIES = 2         # scores and their softmax live together
HEADROOM = 0.85    # of the available memory: the weights, the KV cache and the allocator's slack need the rest
VISION_SDPA_BYTES = 1 << 30  # the reference's eager vision attention above this goes through torch's SDPA


def available_bytes() -> int | None:
    """``SCR_EXPORT_MEMORY_GB`` where set, else the kernel's MemAvailable (None where neither is known)."""
    cap = os.environ.get("SCR_EXPORT_MEMORY_GB")
    if cap:
        try:
            return int(float(cap) * 2**30)
        except ValueError:
            raise InputError(f"SCR_EXPORT_MEMORY_GB={cap!r} is not a number", "set it to a size in GB, e.g. 16")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _get(cfg: Any, path: str, default: Any = None) -> Any:
    obj = cfg
    for part in path.split("."):
        obj = getattr(obj, part, None) if not isinstance(obj, dict) else obj.get(part)
        if obj is None:
            return default
    return obj


def estimate(family: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """The largest attention transient of these inputs: {"bytes", "what", "patches" (vision, per image), "cost"}.
    ``cost`` is how the vision bytes grow with the patches n: ("quadratic", c) for c * n^2 (eager), ("linear", c)
    for c * n (fused), which is how ``check`` computes the size that fits."""
    import numpy as np

    cfg = family.config
    out: dict[str, Any] = {"bytes": 0, "what": "nothing", "patches": 0, "heads": 0, "cost": None}
    grid = tensors.get("image_grid_thw")
    if grid is not None and len(grid):  # Qwen2-VL: one full attention over each image's patches
        heads = int(_get(cfg, "vision_config.num_heads", 0) or 0)
        patches = int(np.max(np.prod(np.asarray(grid), axis=-1)))
        mode = getattr(family, "vision_attention", "eager")
        if heads:
            cost = ("quadratic", COPIES * heads * FLOAT)  # scores and probabilities, [heads, n, n]
            if mode == "fused" or (mode == "sdpa-above" and cost[1] * patches**2 > VISION_SDPA_BYTES):
                width = int(_get(cfg, "vision_config.embed_dim", 0) or _get(cfg, "vision_config.hidden_size", 0)
                            or 0) or 64 * heads
                cost = ("linear", 4 * width * FLOAT)  # q, k, v and the output; the kernel's blocks are L2-sized
            b = cost[1] * (patches**2 if cost[0] == "quadratic" else patches)
            kind = "" if cost[0] == "quadratic" else "memory-efficient "
            out.update(bytes=b, what=f"the vision encoder's {kind}attention over {patches} patches ({heads} heads)",
                       patches=patches, heads=heads, cost=cost)
    ids = tensors.get("input_ids")
    if ids is not None:
        batch, length = np.asarray(ids).shape
        heads = int(_get(family.text_config, "num_attention_heads", 0) or 0)
        b = COPIES * batch * heads * length**2 * FLOAT
        if heads and b > out["bytes"]:
            out.update(bytes=b, what=f"the decoder's attention over {length} prompt tokens x {batch} ({heads} heads)",
                       patches=0, cost=None)
    return out


def check(family: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """Raise an InputError naming the estimate, what is available and the fix when the input would not fit."""
    est = estimate(family, tensors)
    avail = available_bytes()
    if avail is None or est["bytes"] <= HEADROOM * avail:
        return est
    fix = "use a smaller image, fewer images or a shorter prompt"
    if est["patches"] and est["cost"]:
        # patches that fit: cost * n^2 (or n) <= HEADROOM * avail; a patch is 14x14 pixels
        kind, c = est["cost"]
        n = int(math.sqrt(HEADROOM * avail / c) if kind == "quadratic" else HEADROOM * avail / c)
        patch = int(_get(family.config, "vision_config.patch_size", 14) or 14)
        fix = (f"resize the image to at most about {n * patch * patch / 1e6:.2f} megapixels ({n} patches of "
               f"{patch}x{patch}), or lower the processor's max_pixels in the directory's preprocessor_config.json")
    raise InputError(f"this input needs about {est['bytes'] / 2**30:.1f} GB for {est['what']}, and "
                     f"{avail / 2**30:.1f} GB is available" + (" (SCR_EXPORT_MEMORY_GB)" if os.environ.get(
                         "SCR_EXPORT_MEMORY_GB") else ""), fix)
