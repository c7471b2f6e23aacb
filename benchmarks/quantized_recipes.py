"""Measurement (not a test): why scr-export's int8 recipe is MatMul-only, on a real converted model.

    python benchmarks/quantized_recipes.py [--model small-llava] [--work DIR] [--samples 8]

Calibrates the float32 decoder once with SCR on (the same reader `convert` uses) over every tensor, then quantizes
it three ways with ONNX Runtime's `quantize_static` (static int8 Q/DQ, symmetric, per-channel weights):
  * ORT's default op set (Add, Mul, Softmax, ... all get Q/DQ: the residual stream and the SCR nodes' neighbours);
  * MatMul-only with the lm_head quantized too;
  * scr-export's recipe: the decoder's linear layers only, lm_head float.
Each decoder is run with the float32 diagnostic graph (so every variant uses the same plans) and compared with the
float32 PyTorch model: logits cosine and the SCR-effect cosine. Also prints the calibrated ranges with SCR on vs
off per decoder layer (max|range| ratio over the layer's linear-layer inputs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-llava")
    ap.add_argument("--work", help="keep the directories here")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from calibration import ranges
    from calibration.data import load_calibration_data
    from calibration.reader import SCRCalibrationReader
    from calibration.recipe import _QuietRoot, _scr_nodes, _load, linear_matmuls, to_quantize
    from graph_passes.edges import tensor_edges
    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.convert import convert_to_onnx
    from scr_export.loading import load_vlm
    from scr_export.parity import _compare_runs, default_inputs
    from scr_export.reference import TorchReference

    work = Path(args.work or tempfile.mkdtemp(prefix="scr-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(f"[recipes] {m}", file=sys.stderr)  # noqa: E731
    base = work / "float-opset21"
    if not base.exists():
        convert_to_onnx(args.model, base, opset=21, progress=log)
    dec = base / "decoder_model_merged.onnx"
    runner = OrtVLM(base, device="cpu", scr_kernel="function")
    samples = load_calibration_data(None, args.samples, warn=log).samples
    lin = linear_matmuls(dec)
    all_ranges = work / "ranges-all.json"
    if not all_ranges.exists():
        log("calibrating every MatMul and residual tensor (SCR on)")
        reader = SCRCalibrationReader(runner, samples, scr=True)
        # op_types=None in ORT's calibrator: every float tensor, as its default op set needs
        data = ranges.calibrate(dec, reader, CalibrationMethod.MinMax, tensors=None, op_types=None)
        save_tensors_data(data, all_ranges)
    layer_of = {info["activation"]: info["layer"] for info in lin.values() if info["layer"] is not None}
    on = ranges.calibrate(dec, SCRCalibrationReader(runner, samples, scr=True), CalibrationMethod.MinMax,
                          sorted(layer_of))
    off = ranges.calibrate(dec, SCRCalibrationReader(runner, samples, scr=False), CalibrationMethod.MinMax,
                           sorted(layer_of))
    ratios = ranges.on_off_ratios(on, off, layer_of)

    quant, keep = to_quantize(dec)
    scr = [n.name for n in _scr_nodes(_load(dec))]
    common = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                  weight_type=QuantType.QInt8, use_external_data_format=True, calibrate_method=CalibrationMethod.MinMax,
                  calibration_cache_path=str(all_ranges))
    sym = {"ActivationSymmetric": True, "WeightSymmetric": True}
    variants = {
        "ORT default op set": dict(op_types_to_quantize=None, extra_options=dict(sym)),
        "MatMul-only, lm_head int8": dict(op_types_to_quantize=["MatMul"], nodes_to_quantize=quant + keep,
                                          extra_options={**sym, "MatMulConstBOnly": True,
                                                         "OpTypesToExcludeOutputQuantization": ["MatMul"]}),
        "scr-export (linear layers, lm_head float)": dict(
            op_types_to_quantize=["MatMul"], nodes_to_quantize=quant, nodes_to_exclude=keep + scr,
            extra_options={**sym, "MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"]}),
    }
    fam = load_vlm(args.model)
    images, prompts = default_inputs()
    print(f"model {args.model}: int8 Q/DQ decoders, float32 diagnostic graph, {args.samples} calibration samples "
          "(SCR on), one image, against the float32 PyTorch model")
    print(f"{'recipe':<44} {'logits cos':>10} {'SCR effect cos':>15} {'Q/DQ on SCR or Add':>19}")
    for name, kw in variants.items():
        d = work / f"variant-{list(variants).index(name)}"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(base, d)
        for p in d.glob("decoder_model_merged.onnx*"):
            p.unlink()
        with _QuietRoot():
            quantize_static(str(dec), str(d / "decoder_model_merged.onnx"), None, **common, **kw)
        m = _load(d / "decoder_model_merged.onnx")
        producer, _ = tensor_edges(m.graph)
        touching = sum(1 for n in m.graph.node if n.op_type in ("Add", "SCRNeighbourInject")
                       and any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                               for i in n.input))
        cand = OrtVLM(d, device="cpu")
        inputs = cand.encode(images, prompts)
        rep = _compare_runs(cand, TorchReference(fam), inputs, cand.config, 4, "report")
        cos = min(c.cosine for c in rep.comparisons)
        print(f"{name:<44} {cos:>10.5f} {rep.scr_effect_cosine_same_plan:>15.4f} {touching:>19}")
    print("ranges with SCR on / off, per decoder layer (max and mean over its linear layers' inputs):")
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
