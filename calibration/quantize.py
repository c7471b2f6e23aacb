"""Quantized conversion: `scr-export convert MODEL --to onnx|trt --precision int8|int4|fp8`.

The float32 graphs are exported as for `--precision fp32` (the decoder and diagnostic graphs at opset 21, so no
quantizer has to upgrade the opset, which would drop the SCR function), then, inside the staging directory, before
anything appears at ``--out``:

1. calibration (int8, fp8): the float pipeline runs the calibration pairs with SCR on (``reader.py``); ONNX Runtime's
   calibrator collects the ranges of the linear layers' activations, cached by checkpoint, SCR config and data
   (``ranges.py``); the same feeds with SCR off give the on/off range report;
2. quantization with the SCR-safe recipe (``recipe.py``) of the decoder and the diagnostic graph; the vision encoder
   and the token embeddings stay float32 (README, "Quantized models": what each choice does to the plan);
3. the structural check of each quantized graph; the ranges are copied into ``calibration/`` of the artefact;
4. the manifest records the recipe, the tools' versions, the calibration and the check; `convert` then validates the
   directory against the float32 PyTorch model with the precision's gates.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scr_export.errors import SCRExportError

from .data import CalibrationSet, load_calibration_data
from scr_export.manifest import QUANTIZED as PRECISIONS

from .recipe import (INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE, check_quantized, linear_matmuls, quantize_int8_or_fp8,
                     quantize_weight_only, to_quantize)

# SmoothQuant's migration strength for the MLP's down projection (graph_passes/smoothing.py); 0.5 is the paper's
# default. Measured on toy-llava (README, "Quantized models"): int8's SCR effect with the reference's plan 0.91 -> 0.96
# (0.97 at 0.7); fp8 gets none by default: ORT sets E4M3 weight scales from each column's std, and the rows smoothing
# scales up are clipped by them (fp8 logits cosine 0.9995 -> 0.991 with smoothing).
SMOOTH_ALPHA = 0.5
SMOOTH_DEFAULT = {"int8": SMOOTH_ALPHA, "fp8": None}
QUANT_OPSET = 21   # blocked int4 and float8 Q/DQ need 21; exporting at 21 keeps the SCR function's opset equal
DIAGNOSTIC_CHOICES = ("auto", "same", "w8", "float")
# what the diagnostic graph becomes by default, per (precision, target): the plan's stability measured on
# small-llava (README, "Quantized models"): int8 Q/DQ keeps source Jaccard 0.955, int4 0.77 (too far: the diagnostic
# then takes int8 weight-only blocks, or stays float32 for TensorRT, which ORT's tools give no 8-bit weight-only file)
DIAGNOSTIC_DEFAULT = {("int8", "onnx"): "same", ("int8", "trt"): "same", ("fp8", "onnx"): "same",
                      ("fp8", "trt"): "same", ("int4", "onnx"): "w8", ("int4", "trt"): "float"}


@dataclasses.dataclass
class QuantizeSpec:
    precision: str                       # int8 | int4 | fp8
    target: str = "onnx"                 # onnx | trt (int4: MatMulNBits for onnx, blocked QDQ for trt)
    calib_data: str | Path | None = None
    calib_samples: int | None = None
    decode_steps: int = 4
    diagnostic: str = "auto"             # the diagnostic graph: like the decoder, int8 weight-only, or float32
    int4_accuracy_level: int = INT4_ACCURACY_LEVEL
    smooth_alpha: float | None = None    # SmoothQuant on the MLP down projections: None = SMOOTH_DEFAULT, 0 = off
    calibration: CalibrationSet | None = None   # filled by check()

    @property
    def int4_format(self) -> str:
        return "matmulnbits" if self.target == "onnx" else "qdq"

    @property
    def diagnostic_precision(self) -> str:
        """int8 | int4 | fp8 (like the decoder), w8 (int8 weight-only) or float."""
        choice = DIAGNOSTIC_DEFAULT[(self.precision, self.target)] if self.diagnostic == "auto" else self.diagnostic
        return self.precision if choice == "same" else choice

    @property
    def needs_calibration(self) -> bool:
        return self.precision in ("int8", "fp8")

    def check(self, warn: Callable[[str], None]) -> "QuantizeSpec":
        """Validate the options and read the calibration data (exit-2 errors before any work)."""
        if self.precision not in PRECISIONS:
            raise SCRExportError(f"precision {self.precision!r} is not a quantized precision",
                                 f"use one of {', '.join(PRECISIONS)}")
        if self.target not in ("onnx", "trt"):
            raise SCRExportError(f"--to {self.target} cannot take --precision {self.precision}",
                                 "quantized graphs are for --to onnx or --to trt; for llama.cpp use --to gguf --quant")
        if self.diagnostic not in DIAGNOSTIC_CHOICES:
            raise SCRExportError(f"--diagnostic-precision {self.diagnostic!r} is unknown",
                                 f"use one of {', '.join(DIAGNOSTIC_CHOICES)}")
        if self.diagnostic == "w8" and self.target != "onnx":
            raise SCRExportError("--diagnostic-precision w8 (MatMulNBits) is for ONNX Runtime only",
                                 "use same or float with --to trt")
        if self.int4_accuracy_level not in (0, 1, 2, 3, 4):
            raise SCRExportError(f"--int4-accuracy-level {self.int4_accuracy_level} is not 0..4",
                                 "use 4 (int8 activations, fast on CPU) or 1 (float32 activations)")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha < 1.0:
            raise SCRExportError(f"--smooth-alpha {self.smooth_alpha} is outside [0, 1)",
                                 f"use {SMOOTH_ALPHA} (SmoothQuant's default) or 0 to turn smoothing off")
        self.smooth_alpha = SMOOTH_DEFAULT.get(self.precision) if self.smooth_alpha is None else self.smooth_alpha or None
        if not self.needs_calibration:
            if self.smooth_alpha:
                raise SCRExportError("int4 is weight-only: --smooth-alpha smooths activation ranges it does not have",
                                     "drop --smooth-alpha, or use --precision int8 or fp8")
            if self.calib_data is not None or self.calib_samples is not None:
                raise SCRExportError("int4 is weight-only (round-to-nearest blocks): it uses no calibration data",
                                     "drop --calib-data / --calib-samples, or use --precision int8 or fp8")
            return self
        self.calibration = load_calibration_data(self.calib_data, self.calib_samples, warn=warn)
        return self


def _replace_graph(src: Path, dst: Path) -> None:
    """Put the quantized ``src`` in place of ``dst`` (IR version 10, weights in ``<dst>.data``)."""
    from graph_passes.io import load_model, save_model

    for p in (dst, dst.with_name(dst.name + ".data")):
        if p.exists():
            p.unlink()
    save_model(load_model(src), dst)


class Quantizer:
    """The quantize step `convert_to_onnx` runs in its staging directory (``__call__(tmp, manifest, family)``)."""

    def __init__(self, spec: QuantizeSpec, progress: Callable[[str], None]):
        self.spec = spec
        self.progress = progress

    def _ranges(self, runner: Any, manifest: dict, graph_file: Path, graph: str, method, scr: bool,
                tensors: list[str]) -> tuple[Path, bool, Any]:
        from . import ranges
        from .reader import SCRCalibrationReader

        spec = self.spec
        key = ranges.cache_key(checkpoint=manifest["source"]["sha256"], scr=manifest["scr"], graph=graph,
                               smoothing=getattr(self, "smoothing_key", None),
                               scr_on=scr, method=str(method), data=spec.calibration.fingerprint,
                               decode_steps=spec.decode_steps, exporter=manifest["exporter"],
                               versions=manifest["versions"], opset=QUANT_OPSET, tensors=sorted(tensors))
        readers: list[Any] = []

        def compute():
            reader = SCRCalibrationReader(runner, spec.calibration.samples, graph=graph, scr=scr,
                                          decode_steps=spec.decode_steps)
            readers.append(reader)
            data = ranges.calibrate(graph_file, reader, method, tensors, shared=runner.shared_weights)
            n = len(spec.calibration.samples)
            self.progress(f"calibrated {graph} (SCR {'on' if scr else 'off'}, {method.name}): {n} samples, "
                          f"{reader.feeds_seen} feeds in {reader.seconds:.1f}s ({n / max(reader.seconds, 1e-9):.2f} "
                          "samples/s)")
            return data

        path, hit = ranges.cached_ranges(key, compute, progress=self.progress)
        return path, hit, (readers[0] if readers else None)

    def _smooth(self, runner: Any, tmp: Path) -> dict[str, Any]:
        """SmoothQuant on the float graphs before their ranges are taken: the down projections' per-channel input
        maxima over the calibration data (the decoder with SCR, as calibrated), folded into the up / down weights of
        the decoder and of the diagnostic graph (in place; a weights file the two share is edited once)."""
        import hashlib

        import onnx

        from graph_passes.smoothing import down_projections, smooth
        from scr_export.convert import GRAPH_FILES

        from . import ranges
        from .reader import SCRCalibrationReader

        spec = self.spec
        t0 = time.perf_counter()
        decoder = tmp / GRAPH_FILES["decoder"]
        lin = linear_matmuls(decoder)
        model = onnx.load(str(decoder), load_external_data=False)
        dims = {t.name: list(t.dims) for t in model.graph.initializer}
        pairs = down_projections(model, lin)
        del model
        if not pairs:
            raise SCRExportError("the decoder has no MLP down projection smoothing can fold (up * act(gate) -> down)",
                                 "convert with --smooth-alpha 0 (smoothing off)")
        reader = SCRCalibrationReader(runner, spec.calibration.samples, graph="decoder", scr=True,
                                      decode_steps=spec.decode_steps)
        stats = ranges.channel_absmax(decoder, reader, {p.activation: dims[p.down_weight][0] for p in pairs},
                                      shared=runner.shared_weights)
        by_layer = {p.layer: stats[p.activation] for p in pairs}
        digest = hashlib.sha256(b"".join(by_layer[k].tobytes() for k in sorted(by_layer)))
        self.smoothing_key = f"{spec.smooth_alpha}:{digest.hexdigest()[:16]}"
        done: set = set()
        record: dict[str, Any] = {"method": "SmoothQuant on the MLP down projections (graph_passes/smoothing.py)",
                                  "alpha": spec.smooth_alpha, "graphs": {}}
        for g in ("decoder", "diagnostic"):
            path = tmp / GRAPH_FILES[g]
            if not path.is_file():
                continue
            g_lin = lin if g == "decoder" else linear_matmuls(path)
            g_pairs = down_projections(onnx.load(str(path), load_external_data=False), g_lin)
            acts = {p.activation: by_layer[p.layer] for p in g_pairs if p.layer in by_layer}
            record["graphs"][g] = smooth(path, g_lin, acts, spec.smooth_alpha, done=done)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        worst = max((v["act_max_over_median_before"], v["act_max_over_median_after"])
                    for v in record["graphs"]["decoder"].values())
        self.progress(f"smoothed {len(pairs)} down projections (alpha {spec.smooth_alpha}): activation max / median "
                      f"channel {worst[0]:.0f} -> {worst[1]:.0f} at worst, {record['seconds']:.1f}s")
        return record

    def __call__(self, tmp: Path, manifest: dict, family: Any) -> None:
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import load_tensors_data

        import onnxruntime

        from runtimes.onnxruntime_runner import OrtVLM
        from scr_export.convert import GRAPH_FILES

        from . import ranges

        spec = self.spec
        t0 = time.perf_counter()
        precision_of = {"decoder": spec.precision}
        if spec.diagnostic_precision != "float":
            precision_of["diagnostic"] = spec.diagnostic_precision
        graphs = list(precision_of)
        files = {g: tmp / GRAPH_FILES[g] for g in graphs}
        record: dict[str, Any] = {
            "precision": spec.precision, "target": spec.target, "tool": f"onnxruntime {onnxruntime.__version__}",
            "graphs": {}, "float_graphs": [g for g in manifest["graphs"] if g not in graphs],
            **({"int4_accuracy_level": spec.int4_accuracy_level, "int4_block_size": INT4_BLOCK_SIZE}
               if spec.precision == "int4" else {}),
            "recipe": "MatMul-only: the decoder's linear layers; SCR nodes, residual adds, norms, softmax, "
                      "attention MatMuls and the lm_head stay float",
        }
        if spec.needs_calibration:
            # MinMax for both: int8's symmetric ranges, and fp8's amax scales (ranges.fp8_amax_ranges: ORT's own
            # Distribution estimate clips a trained decoder's outlier channels; toy-llava cosine 0.44 -> README)
            method = CalibrationMethod.MinMax
            # the float graphs, as `run` runs them; the weights file mapped once for the runner and the calibrator
            runner = OrtVLM(tmp, device="cpu", scr_kernel="function", attention="eager", share_weights=True)
            if spec.smooth_alpha:
                record["smoothing"] = self._smooth(runner, tmp)
                runner.release()  # its mapped weights predate the edit: the ranges run on the smoothed graphs
                del runner
                runner = OrtVLM(tmp, device="cpu", scr_kernel="function", attention="eager", share_weights=True)
            cal: dict[str, Any] = {**spec.calibration.describe(), "method": method.name,
                                   "decode_steps": spec.decode_steps, "graphs": {}}
            if spec.calibration.synthetic:
                self.progress("WARNING: calibrating on the built-in synthetic images (pass --calib-data for real "
                              "calibration)")
            reader = None
            for g in [g for g in graphs if precision_of[g] in ("int8", "fp8")]:
                quant, _ = to_quantize(files[g])
                lin = linear_matmuls(files[g])
                tensors = sorted({lin[n]["activation"] for n in quant})
                scr = g == "decoder"  # the diagnostic pass runs without SCR by definition
                path, hit, reader = self._ranges(runner, manifest, files[g], g, method, scr, tensors)
                entry: dict[str, Any] = {"ranges": ranges.copy_into(path, tmp, g, fp8_amax=precision_of[g] == "fp8"),
                                         "cache": "hit" if hit else "miss",
                                         "cache_key": path.stem}
                if reader is not None:
                    entry["samples_with_scr_plan"] = sum(1 for p in reader.plans if not _identity(p))
                if g == "decoder":  # the on/off report (MinMax, whatever the method)
                    on_path, _, _ = self._ranges(runner, manifest, files[g], g, CalibrationMethod.MinMax, True, tensors)
                    off_path, _, _ = self._ranges(runner, manifest, files[g], g, CalibrationMethod.MinMax, False,
                                                  tensors)
                    entry["scr_on_off_range_ratio"] = ranges.on_off_ratios(
                        load_tensors_data(on_path), load_tensors_data(off_path), ranges.layer_of_tensor(files[g]))
                cal["graphs"][g] = entry
            record["calibration"] = cal
            runner.release()  # its sessions (and the readers that hold it) before quantization loads the graphs
            del runner, reader
            import gc

            gc.collect()
        qdir = tmp / "quantized"
        qdir.mkdir()
        for g in graphs:
            src = files[g]
            quant, keep = to_quantize(src)
            dst = qdir / src.name
            prec = precision_of[g]
            bits = {"int4": 4, "w8": 8}.get(prec)
            fmt = spec.int4_format if prec == "int4" else "matmulnbits" if prec == "w8" else "qdq"
            level = spec.int4_accuracy_level if prec == "int4" else 1
            self.progress(f"quantizing {g}: {len(quant)} linear layers to "
                          + {"w8": "int8 weight-only"}.get(prec, prec) + (f" ({fmt})" if bits else "")
                          + f", {len(keep)} kept float (lm_head)")
            if bits:
                quantize_weight_only(src, dst, fmt, accuracy_level=level, bits=bits)
            else:
                quantize_int8_or_fp8(src, dst, tmp / record["calibration"]["graphs"][g]["ranges"], prec)
            first, last = manifest["scr"]["layers"]
            structure = check_quantized(dst, "int8" if prec == "w8" else prec, fmt, quant, keep,
                                        last - first + 1 if g == "decoder" else None, bits=bits or 4)
            if g == "decoder":  # the diagnostic graph shares the float weights file the decoder is about to drop
                _own_weights(tmp / GRAPH_FILES["diagnostic"], src)
            _replace_graph(dst, src)
            record["graphs"][g] = {"precision": prec, "format": fmt, **structure,
                                   **({"bits": bits, "block_size": INT4_BLOCK_SIZE} if bits else {}),
                                   **({"accuracy_level": level} if fmt == "matmulnbits" else {})}
        shutil.rmtree(qdir)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        manifest["precision"] = spec.precision
        manifest["quantization"] = record
        self.progress(f"quantized in {record['seconds']}s")


def _own_weights(graph: Path, decoder: Path) -> None:
    """Give ``graph`` a weights file of its own where it refers to ``decoder``'s (copied tensor by tensor)."""
    import onnx

    from graph_passes.io import load_model, save_model

    data = decoder.name + ".data"
    m = onnx.load(str(graph), load_external_data=False)
    if any(e.key == "location" and e.value == data for t in m.graph.initializer for e in t.external_data):
        save_model(load_model(graph), graph)


def _identity(plan: Any) -> bool:
    import numpy as np

    return bool(np.all(plan.scale == 1) and np.all(plan.weight == 0))


def convert_quantized(model: str, out: str | Path, *, spec: QuantizeSpec, config_overrides: dict | None = None,
                      force: bool = False, progress: Callable[[str], None] | None = None, exporter: str = "dynamo",
                      trt_limits: Any = None, build: str = "auto", attention: str = "gqa", validate: bool = True):
    """`convert --precision int8|int4|fp8`: returns (out, report) for --to onnx and (out, report, engines) for trt.
    ``report`` is the validation against the float32 PyTorch model (and the engine-only comparison)."""
    from scr_export.convert import _stderr, check_out_dir, convert_to_onnx

    progress = progress or _stderr
    if exporter != "dynamo":
        raise SCRExportError(f"--exporter {exporter} cannot export the opset-{QUANT_OPSET} graphs quantization needs",
                             "use --exporter dynamo (the default) with --precision int8 / int4 / fp8")
    spec.check(progress)
    check_out_dir(Path(out), force)
    quantizer = Quantizer(spec, progress)
    if spec.target == "trt":
        from runtimes.tensorrt.convert import convert_to_trt
        from runtimes.tensorrt.profiles import Limits

        return convert_to_trt(model, out, precision=spec.precision, limits=trt_limits or Limits(),
                              config_overrides=config_overrides, force=force, progress=progress, build=build,
                              quantize=quantizer, opset=QUANT_OPSET, validate=validate)
    return convert_to_onnx(model, out, precision=spec.precision, exporter=exporter, config_overrides=config_overrides,
                           force=force, progress=progress, quantize=quantizer, opset=QUANT_OPSET, attention=attention,
                           validate=validate)


__all__ = ["QuantizeSpec", "Quantizer", "convert_quantized", "QUANT_OPSET"]
