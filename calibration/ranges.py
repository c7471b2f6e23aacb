"""Activation ranges: ONNX Runtime's calibrator over the SCR-on reader, a cache keyed by what the ranges depend on,
and the report of how SCR moves them (ranges with SCR on vs off, per decoder layer).

The cache file is ONNX Runtime's own calibration-cache JSON (``save_tensors_data``), so ``quantize_static`` reads it
through ``calibration_cache_path`` and skips calibration. Its key hashes the checkpoint, the SCR config, the
calibration data, the method, the decode steps, the graph and the versions that name its tensors; anything else
(another checkpoint, another λ or layer range, other images) is a different file, never a stale hit.
"""

from __future__ import annotations

import hashlib
import os
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.calibrate import TensorsData, load_tensors_data, save_tensors_data

CACHE_FORMAT = 2  # 2: the diagnostic graph outputs per-layer head-mean rows (no query-mask input)


class _Feeds:
    """One sample's feeds as a reader (the calibrator reduces and merges at the end of every collect_data call)."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def cache_dir() -> Path:
    from scr_export.presets import cache_root

    return cache_root() / "calibration"


def cache_key(**parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (checkpoint hash, SCR config, data fingerprint, method, ... )."""
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def calibrate(model_path: Path, reader: Any, method: CalibrationMethod, tensors: list[str] | None = None,
              symmetric: bool = True, op_types: list[str] | None = ("MatMul",), shared: Any = None) -> TensorsData:
    """Run ONNX Runtime's calibrator for ``method`` over ``reader``. ``tensors`` limits what is calibrated to the
    activation inputs of the MatMuls that will be quantized (fewer augmented outputs, less memory per feed);
    default: every input and output of ``op_types`` nodes (None: of every node), as ORT does."""
    from onnxruntime.quantization import calibrate as C

    classes = {CalibrationMethod.MinMax: C.MinMaxCalibrater, CalibrationMethod.Distribution: C.DistributionCalibrater,
               CalibrationMethod.Entropy: C.EntropyCalibrater, CalibrationMethod.Percentile: C.PercentileCalibrater}
    # Memory stays bounded by one sample's feeds: collect_data is called per sample and reduces at its end. (ORT's
    # own bound, max_intermediate_outputs, *discards* the outputs it has collected when it is reached, in 1.32.)
    kwargs: dict[str, Any] = {}
    if method == CalibrationMethod.MinMax:
        kwargs = {"symmetric": symmetric}
    elif method == CalibrationMethod.Distribution:  # ORT's defaults for it (the class's own are refused by it)
        kwargs = {"num_bins": 2048, "scenario": "same"}
    wanted = set(tensors) if tensors is not None else None

    class Selected(classes[method]):  # type: ignore[misc, valid-type]
        def create_inference_session(self):
            """ORT's own session options, plus the weights shared with the reader's runner (``shared``: one
            memory-mapped copy of the weights file for both)."""
            import onnxruntime

            opts = onnxruntime.SessionOptions()
            opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            if shared is not None:
                shared.attach(opts, Path(self.augmented_model_path))
            self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                              providers=self.execution_providers)

        def select_tensors_to_calibrate(self, model):
            chosen, value_infos = super().select_tensors_to_calibrate(model)
            return (chosen if wanted is None else {t for t in chosen if t in wanted}), value_infos

    model_path = Path(model_path)
    # The augmented graph (the model with the calibrated tensors as extra outputs) is written beside the model and
    # keeps referring to its weights file: ORT's calibrator would load the float model twice (to infer shapes, then
    # to save the augmented copy) and write a second copy of the weights; here it sees the graph without weights.
    aug = model_path.with_name(f".calibration-{model_path.stem}-{os.getpid()}.onnx")
    try:
        from .recipe import structure_only_loading

        with structure_only_loading():
            calibrator = Selected(model_path, list(op_types) if op_types else None, str(aug),
                                  use_external_data_format=False, **kwargs)
        calibrator.augment_graph()
        calibrator.model = None  # its structure only, and not needed again
        calibrator.execution_providers = ["CPUExecutionProvider"]
        calibrator.create_inference_session()
        for feeds in reader.per_sample():
            if method == CalibrationMethod.MinMax:
                calibrator.collect_data(_Feeds(feeds))
            else:  # histogram collectors stack a call's outputs: prefill and decode shapes differ, so one feed a call
                for feed in feeds:
                    calibrator.collect_data(_Feeds([feed]))
        data = calibrator.compute_data()
        del calibrator
    finally:
        aug.unlink(missing_ok=True)
    return data


def cached_ranges(key: str, compute, *, progress=lambda m: None) -> tuple[Path, bool]:
    """The cache file for ``key``: reused when present, else ``compute()`` (-> TensorsData) and saved atomically.
    Returns (path, hit)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{key}.json"
    if path.is_file():
        try:
            load_tensors_data(path)
            progress(f"calibration cache hit: {path.name[:16]}… (delete {d} to recalibrate)")
            return path, True
        except (ValueError, KeyError, json.JSONDecodeError):
            progress(f"calibration cache {path.name[:16]}… is unreadable; recalibrating")
    data = compute()
    tmp = path.with_suffix(f".tmp{np.random.randint(1 << 30)}")
    save_tensors_data(data, tmp)
    tmp.replace(path)
    return path, False


def copy_into(path: Path, directory: Path, name: str) -> str:
    """Keep the ranges in the artefact (``calibration/<name>.json``); returns the relative path."""
    out = directory / "calibration"
    out.mkdir(exist_ok=True)
    shutil.copyfile(path, out / f"{name}.json")
    return f"calibration/{name}.json"


def extreme(t: Any) -> float:
    """max |range| of one tensor's calibration data (MinMax: lowest/highest; histograms: the edges)."""
    if hasattr(t, "lowest") and hasattr(t, "highest"):
        lo, hi = np.asarray(t.lowest, np.float64), np.asarray(t.highest, np.float64)
    else:
        edges = np.asarray(t.hist_edges, np.float64)
        lo, hi = edges[0], edges[-1]
    return float(max(np.abs(lo).max(), np.abs(hi).max()))


def layer_of_tensor(model_path: Path) -> dict[str, int]:
    """Activation tensor -> decoder layer of the linear MatMul that reads it (from the exporter's name scopes)."""
    from .recipe import linear_matmuls

    return {info["activation"]: info["layer"] for info in linear_matmuls(model_path).values()
            if info["layer"] is not None}


def on_off_ratios(on: TensorsData, off: TensorsData, layer_of: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per decoder layer: max and mean over its linear layers' activation inputs of max|range| (SCR on) /
    max|range| (SCR off). 1.0 means SCR did not move the range."""
    per: dict[int, list[float]] = {}
    for name, layer in layer_of.items():
        if name in on.data and name in off.data:
            base = extreme(off.data[name])
            per.setdefault(layer, []).append(extreme(on.data[name]) / base if base > 0 else 1.0)
    return {str(layer): {"max": round(max(r), 5), "mean": round(float(np.mean(r)), 5), "tensors": len(r)}
            for layer, r in sorted(per.items())}
