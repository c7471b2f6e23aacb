"""SmoothQuant for the MLP's down projection: move its activation outliers into the weights, exactly.

A trained decoder's ``down_proj`` input, ``act(gate(x)) * up(x)``, carries a few channels whose magnitude is ~100x the
median (toy-llava: 27.7 against 0.24; the same "massive activations" real LLMs have). One symmetric per-tensor
int8 scale then spends its range on those channels, and the image rows SCR edits are rounded to two or three
steps: the SCR effect with the reference's plan fell to 0.91-0.93 (gate 0.95), and fp8's Distribution ranges clip
the outliers outright (logits cosine 0.44). SmoothQuant (Xiao et al., 2023) divides input channel j by

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)

and multiplies row j of the down projection's weight by it; the division is folded into column j of the up
projection's weight (the product ``act(gate) * up`` is linear in ``up``), so the float graph computes the same
function and no node is added. ONNX Runtime's own SmoothQuant option needs Intel Neural Compressor's ONNX adaptor,
which its current releases no longer ship; this pass does the one folding our recipe needs.

Contract: the graph's nodes and initializer names are unchanged; only the up and down weights of each decoder layer
are rewritten, in place in their external-data file (a graph that shares that file, such as the diagnostic graph,
sees the same edit). Before/after, the float graph's outputs agree to float32 rounding (tests/test_smoothing.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from scr_export.errors import SCRExportError

SCALE_FLOOR = 1e-5  # s_j never below this (a channel that is always zero keeps s = 1)


@dataclasses.dataclass(frozen=True)
class DownProjection:
    layer: int
    down: str            # the down projection's MatMul node
    up: str              # the up projection's MatMul node (its output is one factor of the down's input)
    activation: str      # the down projection's input tensor
    down_weight: str     # initializers: [intermediate, hidden] and [hidden, intermediate]
    up_weight: str


def down_projections(model: Any, linear: dict[str, dict[str, Any]]) -> list[DownProjection]:
    """Each decoder layer's (down, up) pair: a MatMul with a constant weight whose input is a ``Mul`` with one factor
    the output of another constant-weight MatMul of the same layer. ``linear``: ``calibration.recipe.linear_matmuls``
    of the same graph."""
    producer = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    found = []
    for name, info in linear.items():
        if info["layer"] is None or info["lm_head"]:
            continue
        mul = producer.get(info["activation"])
        if mul is None or mul.op_type != "Mul":
            continue
        ups = [producer[i].name for i in mul.input
               if i in producer and producer[i].name in linear and linear[producer[i].name]["layer"] == info["layer"]]
        if len(ups) != 1:
            continue
        found.append(DownProjection(info["layer"], name, ups[0], info["activation"], by_name[name].input[1],
                                    by_name[ups[0]].input[1]))
    return sorted(found, key=lambda d: d.layer)


def scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), float64; channels never seen active keep 1."""
    if not 0.0 < alpha < 1.0:
        raise SCRExportError(f"smoothing alpha {alpha} is outside (0, 1)",
                             "use a value like 0.5 (SmoothQuant's default), or turn smoothing off")
    a = np.asarray(act_absmax, np.float64)
    w = np.maximum(np.asarray(weight_absmax, np.float64), SCALE_FLOOR)
    s = np.where(a > 0, np.maximum(a, SCALE_FLOOR) ** alpha / w ** (1.0 - alpha), 1.0)
    return np.maximum(s, SCALE_FLOOR)


def _external(tensor: Any, base: Path) -> tuple[Path, int, int]:
    meta = {e.key: e.value for e in tensor.external_data}
    if "location" not in meta:
        raise SCRExportError(f"weight {tensor.name} is stored inside the graph, not in a weights file",
                             "smoothing rewrites external weights in place: export with external data")
    return (base / meta["location"]).resolve(), int(meta.get("offset", 0)), int(meta["length"])


def _mapped(model: Any, base: Path, name: str) -> np.memmap:
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    t = inits[name]
    path, offset, length = _external(t, base)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(t.dims)
    if length != int(np.prod(shape)) * dtype.itemsize:
        raise SCRExportError(f"weight {name}: {length} bytes on disk for shape {shape} {dtype}",
                             "the weights file does not match its graph: re-export")
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


def weight_absmax(model_path: Path, pairs: list[DownProjection]) -> dict[str, np.ndarray]:
    """max |W_j,:| per input channel of each down projection (read from its weights file)."""
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    return {p.down: np.abs(np.asarray(_mapped(model, model_path.parent, p.down_weight), np.float64)).max(axis=1)
            for p in pairs}


def smooth(model_path: Path, linear: dict[str, dict[str, Any]], act_absmax: dict[str, np.ndarray], alpha: float,
           *, done: set | None = None) -> dict[str, Any]:
    """Fold the smoothing scales into ``model_path``'s up and down weights, in place. ``act_absmax``: the per-channel
    max |X| of each down projection's input (by tensor name) over the calibration data. ``done``: the
    (file, offset) pairs already rewritten (a second graph on the same weights file is not smoothed twice).
    Returns what was done, per layer: the scales' range and the activation's max / median channel before and after."""
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    pairs = down_projections(model, linear)
    if not pairs:
        raise SCRExportError(f"{model_path.name}: no MLP down projection found (a MatMul fed by up * act(gate))",
                             "this family's MLP is not the gated one smoothing knows; convert with smoothing off")
    done = set() if done is None else done
    record = {}
    for p in pairs:
        if p.activation not in act_absmax:
            continue  # a graph whose layers the statistics do not cover (none of ours)
        down = _mapped(model, model_path.parent, p.down_weight)
        up = _mapped(model, model_path.parent, p.up_weight)
        if down.shape[0] != up.shape[1]:
            raise SCRExportError(f"layer {p.layer}: down weight {down.shape} does not follow up weight {up.shape}",
                                 "the export's MatMul layout changed: report this with the model")
        a = np.asarray(act_absmax[p.activation], np.float64)
        w = np.abs(np.asarray(down, np.float64)).max(axis=1)
        s = scales(a, w, alpha)
        keys = {_external(t, model_path.parent)[:2] for t in model.graph.initializer
                if t.name in (p.down_weight, p.up_weight)}
        if keys & done:  # the weights file another graph shares: smoothed with that graph's scales already
            record[str(p.layer)] = {"shared": "smoothed with the graph that shares this weights file"}
            continue
        if True:
            down[:] = (np.asarray(down, np.float64) * s[:, None]).astype(down.dtype)
            up[:] = (np.asarray(up, np.float64) / s[None, :]).astype(up.dtype)
            down.flush()
            up.flush()
            done |= keys
        after = a / s
        record[str(p.layer)] = {"scale_min": round(float(s.min()), 5), "scale_max": round(float(s.max()), 5),
                                "act_max_over_median_before": round(float(a.max() / max(np.median(a), 1e-12)), 2),
                                "act_max_over_median_after": round(float(after.max() / max(np.median(after), 1e-12)),
                                                                   2)}
        del down, up
    return record
