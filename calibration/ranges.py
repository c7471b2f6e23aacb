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


def copy_into(path: Path, directory: Path, name: str, fp8_amax: bool = False) -> str:
    """Keep the ranges in the artefact (``calibration/<name>.json``); returns the relative path. ``fp8_amax``: MinMax
    ranges written the way ONNX Runtime's float8 quantizer reads them (``fp8_amax_ranges``)."""
    out = directory / "calibration"
    out.mkdir(exist_ok=True)
    if fp8_amax:
        save_tensors_data(fp8_amax_ranges(load_tensors_data(path)), out / f"{name}.json")
    else:
        shutil.copyfile(path, out / f"{name}.json")
    return f"calibration/{name}.json"


def fp8_amax_ranges(data: TensorsData) -> TensorsData:
    """E4M3 activation scales from each tensor's max |x| (scale = amax / 448, what TensorRT's FP8 recipe uses)
    instead of ONNX Runtime's Distribution estimate. ORT sets a float8 scale to std(x) / std(E4M3 values), which
    saturates at about 4.6 standard deviations: a trained decoder's MLP input with channels ~100x its median is
    clipped to a fraction of its range (toy-llava fp8: logits cosine 0.44). ORT's quantizer accepts float8 ranges only
    as Distribution data, so the amax is written as the std that gives its scale (avg 0)."""
    from onnx import TensorProto
    from onnxruntime.quantization.calibrate import TensorData
    from onnxruntime.quantization.quant_utils import compute_scale_zp_float8

    if data.calibration_method != CalibrationMethod.MinMax:
        raise ValueError(f"fp8 amax ranges are made from MinMax data, not {data.calibration_method}")
    one = np.array(1.0, np.float32)
    per_std = float(compute_scale_zp_float8(TensorProto.FLOAT8E4M3FN, one)[1])  # the scale a std of 1 gets
    e4m3_max = 448.0
    out = {}
    for name, t in data.items():
        amax = extreme(t)
        std = np.array(amax / e4m3_max / per_std, np.float32)
        out[name] = TensorData(avg=np.array(0.0, np.float32), std=std, lowest=np.asarray(t.lowest, np.float32),
                               highest=np.asarray(t.highest, np.float32))
    return TensorsData(CalibrationMethod.Distribution, out)


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


def channel_absmax(model_path: Path, reader: Any, tensors: dict[str, int], shared: Any = None) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each tensor in ``tensors`` (name -> channels, the last axis) over ``reader``'s feeds:
    what SmoothQuant's scales need and ORT's calibrators (one range per tensor) do not give. The graph gets, per
    tensor, ``ReduceMax(Abs(Reshape(x, [-1, C])), axes=[0])`` as an extra output, written beside the model without its
    weights (as ``calibrate`` does); memory stays one feed's activations."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    outputs = {}
    for i, (name, channels) in enumerate(sorted(tensors.items())):
        shape, axes, out = f"_smooth_shape_{i}", f"_smooth_axes_{i}", f"_smooth_absmax_{i}"
        model.graph.initializer.extend([helper.make_tensor(shape, TensorProto.INT64, [2], [-1, channels]),
                                        helper.make_tensor(axes, TensorProto.INT64, [1], [0])])
        model.graph.node.extend([
            helper.make_node("Abs", [name], [f"_smooth_abs_{i}"]),
            helper.make_node("Reshape", [f"_smooth_abs_{i}", shape], [f"_smooth_flat_{i}"]),
            helper.make_node("ReduceMax", [f"_smooth_flat_{i}", axes], [out], keepdims=0)])
        model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [channels]))
        outputs[out] = name
    aug = model_path.with_name(f".smoothing-{model_path.stem}-{os.getpid()}.onnx")
    found: dict[str, np.ndarray] = {}
    try:
        onnx.save(model, str(aug))
        del model
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        if shared is not None:
            shared.attach(opts, aug)
        session = onnxruntime.InferenceSession(str(aug), sess_options=opts, providers=["CPUExecutionProvider"])
        names = list(outputs)
        for feeds in reader.per_sample():
            for feed in feeds:
                for out, value in zip(names, session.run(names, feed)):
                    t = outputs[out]
                    found[t] = value if t not in found else np.maximum(found[t], value)
        del session
    finally:
        aug.unlink(missing_ok=True)
    missing = sorted(set(tensors) - set(found))
    if missing:
        raise ValueError(f"no calibration feed reached {missing[:3]}")
    return {k: v.astype(np.float64) for k, v in found.items()}
