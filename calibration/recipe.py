"""The SCR-safe quantization recipes (research/quantization.md), on ONNX Runtime's own quantization tools, and the
structural check every quantized graph must pass.

Where Q/DQ goes matters more than the ranges: SCR's edit of a row (−9 % of the source, +10 % of it added to each
neighbour) is of the order of one int8 step of the residual stream, so any Q/DQ on the residual stream rounds it
away. Only the decoder's linear layers are quantized — MatMuls with a constant weight, named by the exporter's
``layers.N`` scopes, given to the quantizer as an explicit node list — never the SCR nodes, the residual adds around
them, norms, softmax, the attention MatMuls or the lm_head.

| precision | file | tool | arithmetic |
|---|---|---|---|
| int8 | QDQ, per-channel symmetric int8 weights, symmetric per-tensor int8 activations | ``quantize_static`` | ORT CPU fuses to int8 kernels; TensorRT explicit quantization |
| fp8 | QDQ, E4M3 weights (per channel) and activations | ``quantize_static`` (Distribution) | TensorRT on Ada/Hopper; ORT CPU emulates |
| int4 (ORT) | ``MatMulNBits``, 4-bit symmetric blocks of 32 | ``MatMulNBitsQuantizer`` (QOperator) | ORT CPU / CUDA |
| int4 (TRT) | blocked int4 ``DequantizeLinear`` (no zero point) → MatMul | ``MatMulNBitsQuantizer`` (QDQ) | TensorRT weight-only int4; ORT CPU fuses to MatMulNBits |
"""

from __future__ import annotations

import contextlib
import os

import re
from pathlib import Path
from typing import Any

from graph_passes.edges import tensor_edges
from graph_passes.scr_op import DOMAIN, OP_TYPE, PLAN_INPUTS
from scr_export.errors import SCRExportError
INT4_BLOCK_SIZE = 32
# MatMulNBits compute type on ORT CPU: 4 = int8 activations per block (VNNI/AVX2 kernels). Measured on small-llava
# (README, "Quantized models"): it meets the int4 gates and decodes faster than fp32 activations (level 1).
INT4_ACCURACY_LEVEL = 4
_LAYER = re.compile(r"layers\.(\d+)(?:\.|$)")
_SCOPES = "pkg.torch.onnx.name_scopes"


class QuantizationError(SCRExportError):
    """A quantized graph broke one of the SCR-safe rules (a bug, not bad input)."""

    exit_code = 1


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def linear_matmuls(model_path: Path | Any) -> dict[str, dict[str, Any]]:
    """MatMul nodes with a constant weight: name -> {layer (int or None), lm_head (bool), activation, weight}.

    The layer comes from the dynamo exporter's name scopes (``...layers.N...``); the lm_head is the linear layer in
    the ``lm_head`` scope. The legacy exporter names nodes ``/model/layers.N/...``, which the same pattern finds.
    """
    model = _load(model_path) if isinstance(model_path, (str, Path)) else model_path
    inits = {i.name for i in model.graph.initializer}
    found = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        meta = {p.key: p.value for p in n.metadata_props}
        scope = meta.get(_SCOPES, "") + " " + n.name
        layers = _LAYER.findall(scope)
        found[n.name] = {"layer": int(layers[-1]) if layers else None, "lm_head": "lm_head" in scope,
                         "activation": n.input[0], "weight": n.input[1]}
    return found


def to_quantize(model_path: Path) -> tuple[list[str], list[str]]:
    """(decoder linear layers to quantize, linear layers kept float: the lm_head and anything outside a layer)."""
    lin = linear_matmuls(model_path)
    quant = [k for k, v in lin.items() if v["layer"] is not None and not v["lm_head"]]
    keep = [k for k in lin if k not in quant]
    if not quant:
        raise QuantizationError(f"no linear layers found in {Path(model_path).name} (MatMuls with constant weights "
                                "in a layers.N scope)", "the export naming changed: report this with the model")
    return quant, keep


def _scr_nodes(model) -> list:
    return [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]


class _QuietRoot:
    """ONNX Runtime's quantizer logs "consider pre-processing" on the root logger; pre-processing would inline the
    SCR function (research/quantization.md §1.3), so we skip it on purpose and keep the log clean."""

    def __enter__(self):
        import logging

        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        import logging

        logging.getLogger().setLevel(self.level)


@contextlib.contextmanager
def structure_only_loading():
    """While it is active, ONNX Runtime's quantization tools (the calibrator, ``quantize_static``) read a model
    without its external weights (shape inference needs none of them); a weight they quantize is then read from
    its file when they convert it (``onnx.numpy_helper.to_array`` resolves the location from the current directory:
    run them from the model's directory)."""
    import importlib

    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    modules = [importlib.import_module(f"onnxruntime.quantization.{m}") for m in ("calibrate", "quantize")]
    originals = {m: m.load_model_with_shape_infer for m in modules}

    def load(path: Path):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
        add_infer_metadata(model)
        return model

    for m in originals:
        m.load_model_with_shape_infer = load
    try:
        yield
    finally:
        for m, f in originals.items():
            m.load_model_with_shape_infer = f


def quantize_int8_or_fp8(src: Path, dst: Path, ranges: Path, precision: str) -> None:
    """Static QDQ with ranges from ``ranges`` (ORT's calibration-cache JSON; no calibration happens here)."""
    from onnxruntime.quantization import QuantType, quantize_static

    import onnx_ir as ir
    from onnx_ir import external_data

    from graph_passes.io import save_model

    src, dst, ranges = Path(src).resolve(), Path(dst).resolve(), Path(ranges).resolve()  # before any chdir
    quant, keep = to_quantize(src)
    qtype = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    scr = [n.name for n in _scr_nodes(_load(src))]
    # Streaming, as for int4: ORT's quantizer sees the graph without weights and reads each weight it quantizes
    # from the file; its output goes beside ``src`` (so the tensors kept float still name src's weights file), and
    # onnx_ir writes ``dst`` self-contained from the two files, tensor by tensor.
    staged = src.with_name(f"{src.stem}.{precision}-staged.onnx")
    cwd = os.getcwd()
    os.chdir(src.parent)
    try:
        with _QuietRoot(), structure_only_loading():
            _quantize_static(quantize_static, src.name, staged.name, ranges, precision, qtype, quant,
                             keep + scr)
    finally:
        os.chdir(cwd)
    try:
        quantized = ir.load(str(staged))
        external_data.set_base_dir(quantized.graph, src.parent)
        save_model(quantized, dst)
    finally:
        for p in (staged, staged.with_name(staged.name + ".data")):
            p.unlink(missing_ok=True)


def _quantize_static(quantize_static, src, dst, ranges, precision, qtype, quant, exclude) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat

    quantize_static(
        str(src), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
        activation_type=qtype, weight_type=qtype, nodes_to_quantize=quant, nodes_to_exclude=exclude,
        use_external_data_format=True,
        calibrate_method=CalibrationMethod.MinMax if precision == "int8" else CalibrationMethod.Distribution,
        calibration_cache_path=str(ranges),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                       "OpTypesToExcludeOutputQuantization": ["MatMul"],
                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})


def quantize_weight_only(src: Path, dst: Path, fmt: str, accuracy_level: int = INT4_ACCURACY_LEVEL,
                         block_size: int = INT4_BLOCK_SIZE, bits: int = 4) -> None:
    """Weight-only, symmetric blocks along K: ``fmt`` "matmulnbits" (ORT; 4 or 8 bits) or "qdq" (TensorRT; 4 bits,
    the only width ORT's quantizer writes as blocked Q/DQ)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    import onnx

    import onnx_ir as ir
    from onnx_ir import external_data

    from graph_passes.io import save_model

    src, dst = Path(src).resolve(), Path(dst).resolve()  # before any chdir
    quant, keep = to_quantize(src)
    qf = QuantFormat.QOperator if fmt == "matmulnbits" else QuantFormat.QDQ
    level = accuracy_level if fmt == "matmulnbits" else None
    # Streaming: the graph is read without its weights; ORT's quantizer reads each MatMul weight (onnx_ir's external
    # tensor, memory-mapped, resolved from the graph's directory) when it quantizes it, so memory holds the quantized
    # weights and one float weight, not the float model. What stays float (lm_head, norms) is never read here: the
    # quantized graph is written by onnx_ir, which copies those tensors from the source file one at a time.
    model = onnx.load(str(src), load_external_data=False)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=level,
                                       quant_format=qf, op_types_to_quantize=("MatMul",), bits=bits)
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=level,
                             nodes_to_exclude=keep, nodes_to_include=quant, quant_format=qf,
                             op_types_to_quantize=("MatMul",), algo_config=cfg)
    cwd = os.getcwd()
    os.chdir(src.parent)  # the weights' locations are relative to the graph's directory
    try:
        with _QuietRoot():
            q.process()
    finally:
        os.chdir(cwd)
    quantized = ir.from_proto(q.model.model)
    external_data.set_base_dir(quantized.graph, src.parent)
    save_model(quantized, dst)


# -- the structural check ------------------------------------------------------------------------------------------
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def check_quantized(path: Path, precision: str, fmt: str, expected: list[str], kept: list[str],
                    scr_layers: int | None, bits: int = 4) -> dict[str, Any]:
    """Assert the SCR-safe rules on a quantized graph; returns counts for the manifest.

    - the SCR nodes (``scr_layers`` of them; None for graphs without SCR) and their function body are intact, the
      function at the model's opset; no Q/DQ feeds or reads an SCR node; the plan inputs are float and feed only
      SCR nodes;
    - no Add (residual adds, biases) reads a Q/DQ output or feeds a QuantizeLinear;
    - every linear layer in ``expected`` is quantized (no silent partial quantization); those in ``kept`` (the
      lm_head) are float MatMuls; TensorRT's rules: symmetric (zero points absent or 0), int4 blocked without zero
      points.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = _load(path)
    g = model.graph
    producer, consumers = tensor_edges(g)
    inits = {i.name: i for i in g.initializer}
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)

    scr = _scr_nodes(model)
    if scr_layers is not None:
        if len(scr) != scr_layers:
            problems.append(f"{len(scr)} SCR nodes, expected {scr_layers}")
        fn = [f for f in model.functions if f.domain == DOMAIN and f.name == OP_TYPE]
        if not fn:
            problems.append("the SCRNeighbourInject function body is gone")
        else:
            fn_opset = next((o.version for o in fn[0].opset_import if o.domain in ("", "ai.onnx")), None)
            if fn_opset != opset:
                problems.append(f"the SCR function imports opset {fn_opset}, the model {opset}")
        for n in scr:
            for i in n.input:
                p = producer.get(i)
                if p is not None and p.op_type in _QDQ:
                    problems.append(f"{n.name} reads {p.op_type} {p.name}")
            for c in consumers.get(n.output[0], []):
                if c.op_type in _QDQ:
                    problems.append(f"{n.name} feeds {c.op_type} {c.name}")
        inputs = {i.name: i for i in g.input}
        for name in PLAN_INPUTS:
            if name not in inputs:
                problems.append(f"plan input {name} is missing")
                continue
            want = onnx.TensorProto.INT64 if name == "scr_donor" else onnx.TensorProto.FLOAT
            if inputs[name].type.tensor_type.elem_type != want:
                problems.append(f"plan input {name} changed type")
            if any(c.op_type != OP_TYPE for c in consumers.get(name, [])):
                problems.append(f"plan input {name} feeds something other than SCR nodes")
    for n in g.node:
        if n.op_type != "Add":
            continue
        if any(producer.get(i) is not None and producer[i].op_type in _QDQ for i in n.input):
            problems.append(f"Add {n.name} reads a Q/DQ output")
        if any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], [])):
            problems.append(f"Add {n.name} feeds a QuantizeLinear")

    by_name = {n.name: n for n in g.node}
    quantized = 0
    for name in expected:
        # the weight-only quantizer renames what it rewrites: <name>_Q4 (MatMulNBits), <name>_matmul_Q4 (Q/DQ)
        if fmt == "matmulnbits":
            m = by_name.get(f"{name}_Q{bits}")
            ok = name not in by_name and m is not None and m.op_type == "MatMulNBits"
        else:
            n = by_name.get(name) or by_name.get(f"{name}_matmul_Q4")
            w = producer.get(n.input[1]) if n is not None else None
            a = producer.get(n.input[0]) if n is not None else None
            ok = n is not None and n.op_type == "MatMul" and w is not None and w.op_type == "DequantizeLinear"
            if precision in ("int8", "fp8"):
                ok = ok and a is not None and a.op_type == "DequantizeLinear"
        if ok:
            quantized += 1
        else:
            problems.append(f"linear layer {name} was not quantized")
    for name in kept:
        n = by_name.get(name)
        if n is None or n.op_type != "MatMul" or n.input[1] not in inits:
            problems.append(f"{name} (kept float) was changed")

    zero_points_nonzero = 0
    blocked = 0
    for n in g.node:
        if n.op_type in _QDQ and len(n.input) > 2 and n.input[2]:
            zp = inits.get(n.input[2])
            # per-channel zero points of a real-size layer are stored beside the graph, like the weights
            values = numpy_helper.to_array(zp, base_dir=str(Path(path).parent)) if zp is not None else None
            if values is not None and np.any(values.astype(np.float32) != 0):
                zero_points_nonzero += 1
        if n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i > 0 for a in n.attribute):
            blocked += 1
            if len(n.input) > 2 and n.input[2]:
                problems.append(f"blocked DequantizeLinear {n.name} has a zero point (TensorRT needs none)")
    if zero_points_nonzero:
        problems.append(f"{zero_points_nonzero} Q/DQ nodes have non-zero zero points (TensorRT needs symmetric)")
    if fmt == "qdq" and precision == "int4" and blocked != len(expected):
        problems.append(f"{blocked} blocked int4 DequantizeLinear nodes, expected {len(expected)}")
    if problems:
        raise QuantizationError(f"{Path(path).name} breaks the SCR-safe quantization rules: " + "; ".join(problems[:8]),
                                "this is a bug in scr-export's recipe: report it with the model and versions")
    counts: dict[str, int] = {}
    for n in g.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"opset": opset, "linear_quantized": quantized, "linear_kept_float": len(kept),
            "scr_nodes": len(scr), "nodes": {k: counts[k] for k in ("QuantizeLinear", "DequantizeLinear",
                                                                    "MatMulNBits", "MatMul") if k in counts}}
