"""Quantized ONNX graphs (int8, int4, fp8) with SCR-aware calibration: conversion per family, validation against the
float32 PyTorch model, the SCR-safe structure, the calibration reader, the range cache and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxruntime  # noqa: E402,F401  (installed by the README's test command: a failed import fails)

from conftest import TINY_PRESETS, load, make_image  # noqa: E402

from calibration.data import CalibrationDataError, load_calibration_data  # noqa: E402
from calibration.quantize import QuantizeSpec, convert_quantized  # noqa: E402
from calibration.recipe import check_quantized, linear_matmuls, to_quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_DONE: dict[tuple, tuple] = {}

# Gates a tiny random model cannot meet, and why (the numbers are printed by the failing report's table):
# - int4/float cosine and top-1: 4-bit round-to-nearest of random Gaussian weights (64-wide rows: 2 blocks of 32)
#   costs more than a real checkpoint's structured weights do (small-llava: cosine 0.968; Q4_0 GGUF on tiny-llava
#   0.979 likewise); the SCR effect with the reference's plan still meets its gate.
# - fp8/float: ONNX Runtime's Distribution calibration with E4M3's 3-bit mantissa moves the small SCR edit by as
#   much as the edit (research/quantization.md measured 0.90 on its toy); reported, not waved through.
# - int8/float top-1 and SCR effect: random tiny models have near-tied logits (one flip in 16 teacher-forced tokens
#   costs 0.06 of top-1) and per-tensor int8 activations have a step of the order of SCR's edit (tiny-internvl:
#   SCR effect 0.94 with an identical plan; small-llava 0.92).
KNOWN_TINY_FAILURES = {
    "int8": ("top-1 agreement", "SCR effect cosine with the reference's plan"),
    "int4": ("cosine", "top-1 agreement"),
    "fp8": ("top-1 agreement", "SCR effect cosine with the reference's plan"),
}
# what the tiny presets do reach, asserted so a regression below it still fails
# (int8 top-1: tiny-chameleon 0.938, 0.875 since the calibration set gained a flat-colour scene: 2 of 16 near-tied
# tokens of a random model)
FLOORS = {"int8": {"cosine": 0.999, "top1": 0.85, "effect": 0.9}, "int4": {"cosine": 0.96, "top1": 0.5, "effect": 0.95},
          "fp8": {"cosine": 0.995, "top1": 0.6, "effect": 0.75}}  # fp8 llava effect: 0.83, 0.797 since prompts start
# with BOS (the tiny model's fp8 effect moves with any change of its inputs)


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    def get(family: str, precision: str, target: str = "onnx"):
        key = (family, precision, target)
        if key not in _DONE:
            out = tmp_path_factory.mktemp("q") / f"{family}-{precision}-{target}"
            res = convert_quantized(TINY_PRESETS[family], out, spec=QuantizeSpec(precision, target=target),
                                    progress=lambda m: None)
            _DONE[key] = (res[0], res[1])
        return _DONE[key]

    return get


def _failures(report) -> list[str]:
    return list(report.failures)


def _within_known_failures(report, precision: str) -> None:
    """Every failed gate is one the tiny presets are known to miss, and by no more than the floors."""
    allowed = KNOWN_TINY_FAILURES[precision]
    unexplained = [f for f in _failures(report) if not any(a in f for a in allowed)]
    assert not unexplained, report.table()
    floor = FLOORS[precision]
    assert min(c.cosine for c in report.comparisons) >= floor["cosine"], report.table()
    assert report.comparisons[1].top1 >= floor["top1"], report.table()
    assert report.scr_effect_cosine_same_plan >= floor["effect"], report.table()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_every_family_converts_runs_and_validates(family_name, precision, quantized):
    out, reports = quantized(family_name, precision)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == precision and manifest["quantization"]["precision"] == precision
    flt, eng = reports["float"], reports["engine"]
    print(flt.table(), eng.table(), sep="\n")
    assert eng, f"kernel error beyond its gate:\n{eng.table()}"
    _within_known_failures(flt, precision)
    # and the directory runs like any other
    from runtimes.onnxruntime_runner import OrtVLM

    runner = OrtVLM(out, device="cpu")
    res = runner.generate(runner.encode([[make_image(150, 120, seed=3)]], ["Is there a red block?"]),
                          max_new_tokens=4, stop_at_eos=False)
    assert res.tokens.shape == (1, 4) and not res.plan.images[0].skipped


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fp8_converts_and_reports(family, quantized):
    out, reports = quantized(family, "fp8")
    flt, eng = reports["float"], reports["engine"]
    print(flt.table())
    assert eng, eng.table()                          # ORT CPU emulates fp8 Q/DQ: fused and unfused agree
    _within_known_failures(flt, "fp8")
    assert "float8e4m3fn" in {str(t) for t in _q_types(out / "decoder_model_merged.onnx")}


def _q_types(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    types = set()
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            types.add(onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type).lower())
    return types


@pytest.mark.parametrize("precision,target", [("int8", "onnx"), ("int4", "onnx"), ("int4", "trt")])
def test_structure_keeps_scr_float(precision, target, quantized, tmp_path):
    """No Q/DQ touches an SCR node, the residual adds or the plan inputs; the SCR function survived, and the graph
    runs without the custom-op library (the function body)."""
    import onnx

    out, _ = quantized("llava", precision, target)
    path = out / "decoder_model_merged.onnx"
    m = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    scr = [n for n in m.graph.node if n.op_type == "SCRNeighbourInject"]
    assert len(scr) == 2  # tiny-llava: layers 0..1
    for n in scr:
        assert all(producer[i].op_type not in ("QuantizeLinear", "DequantizeLinear") for i in n.input if i in producer)
        assert all(c.op_type not in ("QuantizeLinear", "DequantizeLinear") for c in consumers[n.output[0]])
        # the residual add that made the SCR input is float on both sides
        add = producer[n.input[0]]
        assert add.op_type == "Add"
        assert all(producer[i].op_type != "DequantizeLinear" for i in add.input if i in producer)
    for name in ("scr_scale", "scr_weight"):
        vi = next(i for i in m.graph.input if i.name == name)
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert {c.op_type for c in consumers[name]} == {"SCRNeighbourInject"}
    fn = [f for f in m.functions if f.name == "SCRNeighbourInject"]
    assert fn and {o.version for o in fn[0].opset_import if o.domain == ""} == {21}
    assert {o.version for o in m.opset_import if o.domain == ""} == {21}
    ops = {n.op_type for n in m.graph.node}
    if precision == "int4" and target == "onnx":
        assert "MatMulNBits" in ops and "QuantizeLinear" not in ops
    if precision == "int4" and target == "trt":
        blocked = [n for n in m.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
        assert blocked and all(len(n.input) == 2 for n in blocked)  # no zero point: TensorRT's rule
    if precision == "int8":
        assert "QuantizeLinear" in ops
    # the lm_head stays a float MatMul; every other linear layer was quantized
    lin = linear_matmuls(path)
    assert [v for v in lin.values() if v["lm_head"]] and all(v["lm_head"] for v in lin.values())
    # runs without the custom-op library
    env = {**os.environ, "SCR_EXPORT_ORT_OPS": "function", "PYTHONPATH": str(ROOT)}
    code = ("import sys; from runtimes.onnxruntime_runner import OrtVLM; from conftest import make_image; "
            f"r = OrtVLM({str(out)!r}, device='cpu'); print(r.provider); "
            "res = r.generate(r.encode([[make_image()]], ['hi']), max_new_tokens=2); print(res.tokens.tolist())")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT / "tests"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "function body" in res.stdout


def _float_decoder(tmp_path: Path) -> Path:
    """tiny-llava's float decoder with SCR nodes at the quantization opset (the fp32 path's pieces)."""
    from calibration.quantize import QUANT_OPSET
    from graph_passes.insert_redistribution import InsertRedistributionPass
    from graph_passes.io import load_model, save_model
    from scr_export.onnx_export.decoder import export_decoder

    fam = load("tiny-llava")
    export_decoder(fam, tmp_path / "raw.onnx", opset=QUANT_OPSET)
    m = load_model(tmp_path / "raw.onnx")
    InsertRedistributionPass(fam.scr_config().layer_indices())(m)
    save_model(m, tmp_path / "float.onnx")
    return tmp_path / "float.onnx"


def test_structural_check_catches_qdq_on_the_residual_stream(tmp_path):
    """The checker is not a formality: a Q/DQ pair on an SCR input, or a linear layer left float, is refused."""
    from calibration.recipe import QuantizationError

    quant, keep = to_quantize(_float_decoder(tmp_path))
    # a graph with Q/DQ on an SCR input: insert a Q/DQ pair before the first SCR node by hand
    import onnx
    from onnx import helper, numpy_helper

    g = onnx.load(str(tmp_path / "float.onnx"))
    scr = next(n for n in g.graph.node if n.op_type == "SCRNeighbourInject")
    g.graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                                numpy_helper.from_array(np.array(0, np.int8), "z")])
    q = helper.make_node("QuantizeLinear", [scr.input[0], "s", "z"], ["hq"], name="bad_q")
    dq = helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hdq"], name="bad_dq")
    idx = list(g.graph.node).index(scr)
    g.graph.node.insert(idx, dq)
    g.graph.node.insert(idx, q)
    scr.input[0] = "hdq"
    onnx.save(g, str(tmp_path / "qdq_on_scr.onnx"), save_as_external_data=True, location="qdq_on_scr.onnx.data")
    with pytest.raises(QuantizationError, match="SCRNeighbourInject|scr_inject"):
        check_quantized(tmp_path / "qdq_on_scr.onnx", "int8", "qdq", [], keep, 2)
    # and an unquantized graph is "silent partial quantization"
    with pytest.raises(QuantizationError, match="was not quantized"):
        check_quantized(tmp_path / "float.onnx", "int8", "qdq", quant, keep, 2)


def test_calibration_reader_runs_scr(tmp_path):
    """The reader feeds the decoder the sample's own (non-identity) plan at prefill and the identity at decode steps;
    with SCR off it feeds the identity everywhere. Fails if the reader feeds the identity plan."""
    from calibration.reader import SCRCalibrationReader
    from runtimes.onnxruntime_runner import OrtVLM
    from scr_export.convert import convert_to_onnx
    from scr_export.reference import plan_for_inputs

    out, _ = convert_to_onnx("tiny-llava", tmp_path / "f", progress=lambda m: None)
    with pytest.raises(ValueError, match="eager decoder"):  # the GroupQueryAttention decoder is not quantized
        SCRCalibrationReader(OrtVLM(out, device="cpu"), [], progress=False)
    runner = OrtVLM(out, device="cpu", attention="eager")
    cal = load_calibration_data(None, 3, warn=lambda m: None)
    on = SCRCalibrationReader(runner, cal.samples, scr=True, decode_steps=2, progress=False)
    feeds = [f for batch in on.per_sample() for f in batch]
    assert len(feeds) == 3 * 3  # a prefill and 2 decode steps per sample
    fam = load("tiny-llava")
    for i, sample in enumerate(cal.samples):
        prefill, decode = feeds[3 * i], feeds[3 * i + 1: 3 * i + 3]
        ref = plan_for_inputs(fam, runner.encode([[sample.image]], [sample.prompt]), runner.config)
        assert np.array_equal(prefill["scr_scale"], ref.scale) and np.array_equal(prefill["scr_donor"], ref.donor)
        assert (prefill["scr_scale"] < 1).sum() == runner.config.k and (prefill["scr_weight"] > 0).any()
        for d in decode:
            assert d["inputs_embeds"].shape[1] == 1 and d["past_key_values.0.key"].shape[2] > 0
            assert np.all(d["scr_scale"] == 1) and np.all(d["scr_weight"] == 0)
    off = SCRCalibrationReader(runner, cal.samples, scr=False, decode_steps=0, progress=False)
    assert all(np.all(f["scr_scale"] == 1) for batch in off.per_sample() for f in batch)


def test_ranges_with_scr_on_differ_from_off_and_the_report_says_by_how_much(quantized):
    out, _ = quantized("llava", "int8")
    cal = json.loads((out / "manifest.json").read_text())["quantization"]["calibration"]
    ratios = cal["graphs"]["decoder"]["scr_on_off_range_ratio"]
    assert set(ratios) == {"0", "1", "2", "3"}
    assert any(abs(r["max"] - 1) > 1e-4 for r in ratios.values()), ratios  # SCR moved some range
    if cal["graphs"]["decoder"]["cache"] == "miss":
        assert cal["graphs"]["decoder"]["samples_with_scr_plan"] == cal["samples"]
    assert (out / cal["graphs"]["decoder"]["ranges"]).is_file()


def test_the_cache_is_used_and_ignored_when_the_scr_config_or_checkpoint_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SCR_EXPORT_CACHE", str(tmp_path / "cache"))
    # presets are rebuilt into the new cache: the same seed gives the same checkpoint hash
    logs: list[str] = []

    def convert(name, **over):
        out = tmp_path / name
        convert_quantized("tiny-llava", out, spec=QuantizeSpec("int8", calib_samples=2), config_overrides=over or None,
                          progress=logs.append)
        return json.loads((out / "manifest.json").read_text())["quantization"]["calibration"]["graphs"]["decoder"]

    first = convert("a")
    assert first["cache"] == "miss" and first["samples_with_scr_plan"] == 2
    second = convert("b")
    assert second["cache"] == "hit" and second["cache_key"] == first["cache_key"]
    assert (tmp_path / "a" / first["ranges"]).read_bytes() == (tmp_path / "b" / second["ranges"]).read_bytes()
    other_scr = convert("c", lam=1.3)
    assert other_scr["cache"] == "miss" and other_scr["cache_key"] != first["cache_key"]
    # another checkpoint: same preset, one weight changed on disk
    from scr_export.presets import ensure_preset

    ckpt = ensure_preset("tiny-llava")
    import shutil

    changed = tmp_path / "changed-ckpt"
    shutil.copytree(ckpt, changed)
    from safetensors.numpy import load_file, save_file

    f = next(changed.glob("*.safetensors"))
    w = load_file(str(f))
    k = next(iter(w))
    w[k] = w[k] + np.float32(1e-3)
    save_file(w, str(f))
    out = tmp_path / "d"
    convert_quantized(str(changed), out, spec=QuantizeSpec("int8", calib_samples=2), progress=logs.append)
    d = json.loads((out / "manifest.json").read_text())["quantization"]["calibration"]["graphs"]["decoder"]
    assert d["cache"] == "miss" and d["cache_key"] != first["cache_key"]


# -- bad input: exit 2, one-line reason, no output directory -----------------------------------------------------
def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "scr_export.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    unreadable = tmp / "unreadable"
    unreadable.mkdir()
    make_image().save(unreadable / "a.png")
    (unreadable / "b.png").write_bytes(b"not a png at all")
    no_prompt = tmp / "no_prompt.jsonl"
    make_image().save(tmp / "ok.png")
    no_prompt.write_text(json.dumps({"image": "ok.png", "prompt": "hi"}) + "\n" + json.dumps({"image": "ok.png"}) + "\n")
    missing = tmp / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nowhere.png", "prompt": "hi"}) + "\n")
    base = ["convert", "tiny-llava", "--to", "onnx"]
    return {
        "empty folder": (base + ["--precision", "int8", "--calib-data", str(empty)], "holds no images"),
        "unreadable image": (base + ["--precision", "int8", "--calib-data", str(unreadable)], "cannot be read"),
        "jsonl without prompt": (base + ["--precision", "int8", "--calib-data", str(no_prompt)], ":2 has no 'prompt'"),
        "missing image": (base + ["--precision", "int8", "--calib-data", str(missing)], "does not exist"),
        "calib-data with fp16": (base + ["--precision", "fp16", "--calib-data", str(tmp)], "need a quantized precision"),
        "calib-data with int4": (base + ["--precision", "int4", "--calib-data", str(tmp)], "uses no calibration data"),
        "int8 for gguf": (["convert", "tiny-llava", "--to", "gguf", "--precision", "int8"], "--quant"),
        "gqa for trt": (["convert", "tiny-llava", "--to", "trt", "--attention", "gqa"], "--attention gqa is for --to onnx"),
    }


@pytest.mark.parametrize("case", ["empty folder", "unreadable image", "jsonl without prompt", "missing image",
                                  "calib-data with fp16", "calib-data with int4", "int8 for gguf", "gqa for trt"])
def test_bad_input_is_exit_2_with_a_reason_and_no_output(case, tmp_path):
    args, expected = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    res = _cli(*args, "--out", str(out))
    assert res.returncode == 2, res.stderr[-2000:]
    first = [line for line in res.stderr.splitlines() if "error:" in line]
    assert first and expected in first[0], res.stderr
    assert not out.exists() and not list(tmp_path.glob(".out-*"))


def test_calibration_data_sources(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        make_image(100 + 10 * i, 80, seed=i).save(folder / f"{i}.png")
    (folder / "prompts.txt").write_text("first prompt\n\nsecond prompt\n")
    s = load_calibration_data(folder)
    assert [x.prompt for x in s.samples] == ["first prompt", "second prompt", "first prompt"]
    assert [x.image.size for x in s.samples] == [(100, 80), (110, 80), (120, 80)]
    sub = tmp_path / "sub"
    sub.mkdir()
    make_image().save(sub / "x.png")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"image": "sub/x.png", "prompt": "what?"}) + "\n\n")
    j = load_calibration_data(jsonl)
    assert len(j.samples) == 1 and j.samples[0].prompt == "what?" and j.fingerprint != s.fingerprint
    assert len(load_calibration_data(folder, 2).samples) == 2
    warned = []
    syn = load_calibration_data(None, warn=warned.append)
    assert syn.synthetic and len(syn.samples) == 8 and warned and "real" in warned[0]
    with pytest.raises(CalibrationDataError, match="not positive"):
        load_calibration_data(folder, 0)


@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="fp8 on ONNX Runtime CUDA needs onnxruntime-gpu and a GPU; this machine has neither")
def test_fp8_on_a_cuda_gpu_without_fp8_is_refused(quantized):  # pragma: no cover - needs a GPU
    import torch

    from runtimes.onnxruntime_runner import OrtVLM, RuntimeUnavailable

    out, _ = quantized("llava", "fp8")
    if torch.cuda.get_device_capability() >= (8, 9):
        OrtVLM(out, device="cuda")
    else:
        with pytest.raises(RuntimeUnavailable, match="fp8"):
            OrtVLM(out, device="cuda")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_trt_build_kit_takes_the_quantized_files_as_they_are(precision, quantized):
    """--to trt at int8/int4: the same Q/DQ files, strongly typed trtexec lines, profiles for every graph, and SCR
    nodes that see only a type the plugin declares. (Building the engines needs TensorRT and a GPU.)"""
    out, _ = quantized("llava", precision, "trt")
    manifest = json.loads((out / "manifest.json").read_text())
    trt = manifest["tensorrt"]
    assert trt["scr_node_types"] == ["FP32"] and trt["quantization"].startswith("explicit")
    assert set(trt["profiles"]) == {"vision", "embed_tokens", "diagnostic", "decoder"}
    script = (out / "build_engines.sh").read_text()
    assert script.count("--stronglyTyped") == 4 and "--int8" not in script and "--fp16" not in script
    assert manifest["quantization"]["target"] == "trt"
    if precision == "int4":
        assert manifest["quantization"]["graphs"]["decoder"]["format"] == "qdq"
    res = subprocess.run(["bash", "-n", str(out / "build_engines.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_plugin_rules_refuse_an_int8_scr_input(tmp_path):
    """If a Q/DQ pass ever hands the SCR node an int8 tensor, the build kit says so instead of building."""
    import onnx
    from onnx import helper, numpy_helper

    from runtimes.tensorrt.plugin_rules import check_plugin_covers

    assert set(check_plugin_covers(_float_decoder(tmp_path)).values()) == {"FP32"}
    g = onnx.load(str(tmp_path / "float.onnx"))
    scr = next(n for n in g.graph.node if n.op_type == "SCRNeighbourInject")
    g.graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                                numpy_helper.from_array(np.array(0, np.int8), "z")])
    g.graph.node.insert(list(g.graph.node).index(scr),
                        helper.make_node("QuantizeLinear", [scr.input[0], "s", "z"], ["hq"], name="q"))
    scr.input[0] = "hq"
    g.graph.value_info.append(helper.make_tensor_value_info("hq", onnx.TensorProto.INT8, None))
    onnx.save(g, str(tmp_path / "int8_scr.onnx"), save_as_external_data=True, location="int8_scr.onnx.data")
    with pytest.raises(ValueError, match="INT8"):
        check_plugin_covers(tmp_path / "int8_scr.onnx")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_group_query_attention_and_eager_decoders_both_validate(precision, quantized):
    """The GroupQueryAttention rewrite runs after quantization (calibration saw the exported graph) over the same
    quantized weights file; the conversion's report is the GQA decoder's (one prompt on the CPU), and the eager
    decoder (batches, TensorRT) gives the same report within the engine's noise. int8 also exercises the x86 uint8
    reload of both files, int4 the accuracy-level-1 rewrite of the engine reference."""
    from scr_export.parity import validate_directory

    out, reports = quantized("internvl", precision)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "gqa" in manifest["graphs"]["decoder"]
    assert "attention: gqa" in reports["float"].provider and "attention: gqa" in reports["engine"].provider
    eager = validate_directory(out, device="cpu", attention="eager")
    assert "attention: eager" in eager["float"].provider
    assert eager["engine"], eager["engine"].table()
    _within_known_failures(eager["float"], precision)
    for a, b in zip(eager["float"].comparisons, reports["float"].comparisons):
        assert abs(a.cosine - b.cosine) <= 1e-3, (a, b)


def test_packed_qkv_is_bit_identical_and_feeds_group_query_attention(tmp_path, quantized):
    """pack_qkv turns a layer's q, k, v MatMulNBits into one plus a Split: the same logits bit for bit (blocks run
    along K, packing stacks along N). The default int4 conversion packs LLaVA's layers and feeds the packed output
    to GroupQueryAttention (rotary inside, no separate key/value inputs)."""
    import shutil

    import onnx
    import onnxruntime as ort

    from graph_passes.pack_projections import pack_qkv

    out, _ = convert_quantized("tiny-llava", tmp_path / "eager", spec=QuantizeSpec("int4"), attention="eager",
                               progress=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    d = manifest["decoder"]
    assert "gqa" not in manifest["graphs"]["decoder"] and "packed_qkv_layers" not in manifest["graphs"]["decoder"]
    packed_dir = tmp_path / "packed"
    packed_dir.mkdir()
    for f in out.glob("decoder_model_merged.onnx*"):
        shutil.copy(f, packed_dir / f.name)
    src, dst = out / "decoder_model_merged.onnx", packed_dir / "decoder_model_merged.onnx"
    heads = load("tiny-llava").text_config.num_attention_heads
    assert pack_qkv(dst, heads, d["kv_heads"], d["head_dim"]) == d["num_layers"]
    ops = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    before = [n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == before.count("MatMulNBits") - 2 * d["num_layers"]
    assert ops.count("SCRNeighbourInject") == before.count("SCRNeighbourInject")
    rng = np.random.default_rng(0)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, dst)]
    hidden = sessions[0].get_inputs()[0].shape[-1]
    feed = {"inputs_embeds": rng.standard_normal((1, 7, hidden)).astype(np.float32),
            "attention_mask": np.ones((1, 7), np.int64), "position_ids": np.arange(7)[None],
            "scr_donor": np.arange(7)[None].astype(np.int64), "scr_scale": np.ones((1, 7), np.float32),
            "scr_weight": np.zeros((1, 7), np.float32)}
    feed["scr_scale"][0, 3], feed["scr_weight"][0, 4], feed["scr_donor"][0, 4] = 1 / 1.1, 0.1, 3
    for i in range(d["num_layers"]):
        for k in ("key", "value"):
            feed[f"past_key_values.{i}.{k}"] = np.zeros((1, d["kv_heads"], 0, d["head_dim"]), np.float32)
    wanted = [{i.name for i in s.get_inputs()} for s in sessions]
    a, b = (s.run(["logits"], {k: v for k, v in feed.items() if k in w})[0] for s, w in zip(sessions, wanted))
    assert np.array_equal(a, b)
    # the default conversion packs and hands the packed projection to the op
    default, _ = quantized("llava", "int4")
    dm = json.loads((default / "manifest.json").read_text())["graphs"]["decoder"]
    assert dm["packed_qkv_layers"] == d["num_layers"] and dm["gqa"]["rotary_inside"]
    g = onnx.load(str(default / dm["gqa"]["file"]), load_external_data=False)
    assert all(n.input[1] == "" and n.input[2] == "" for n in g.graph.node if n.op_type == "GroupQueryAttention")


# The trained toy-llava (issue 21): expectations per precision, over the held-out shapes POPE questions, with the
# README's table as the source. int8 passes every gate (SmoothQuant on the down projections: without it the SCR
# effect with the reference's plan was 0.91-0.93); fp8 (amax scales) keeps the logits (cosine >= 0.995) and the
# answers, and misses only what E4M3's 3-bit mantissa costs a 10 % edit: the norm ratio, the SCR effect and the map
# error of its fp8 diagnostic graph.
TOY_FP8_MISSES = ("|norm ratio - 1|", "SCR effect (ref. plan)", "SCR effect (end-to-end)", "map error (relative)",
                  "source Jaccard", "plan identical")


def _toy_validate(tmp_path, precision: str, limit: int = 30) -> tuple[int, dict]:
    out = tmp_path / f"toy-{precision}"
    conv = subprocess.run([sys.executable, "-m", "scr_export.cli", "convert", "toy-llava", "--to", "onnx",
                           "--precision", precision, "--calib-data", str(ROOT / "examples" / "shapes-calibration"),
                           "--out", str(out), "--no-validate"], capture_output=True, text=True, timeout=900)
    assert conv.returncode == 0, conv.stderr[-3000:]
    report = tmp_path / f"{precision}.json"
    res = subprocess.run([sys.executable, "-m", "scr_export.cli", "validate", str(out), "--data",
                          str(ROOT / "examples" / "shapes-pope" / "adversarial.jsonl"), "--limit", str(limit),
                          "--steps", "2", "--json", str(report)], capture_output=True, text=True, timeout=900)
    assert report.is_file(), res.stderr[-3000:]
    return res.returncode, json.loads(report.read_text())


def test_trained_toy_llava_int8_passes_every_gate(tmp_path):
    rc, report = _toy_validate(tmp_path, "int8")
    failures = [f for c in report["comparisons"].values() for f in c["failures"]]
    assert rc == 0 and report["passed"] and not failures, failures
    manifest = json.loads((tmp_path / "toy-int8" / "manifest.json").read_text())
    smoothing = manifest["quantization"]["smoothing"]
    assert smoothing["alpha"] == 0.5 and set(smoothing["graphs"]["decoder"]) == {"0", "1", "2", "3"}
    assert report["pope"]["agreement_scr"] >= 0.95 and report["pope"]["agreement_off"] >= 0.95


def test_trained_toy_llava_fp8_keeps_logits_and_answers_and_misses_only_the_known_gates(tmp_path):
    rc, report = _toy_validate(tmp_path, "fp8")
    flt = report["comparisons"]["float"]
    assert flt["aggregates"]["cosine"]["tail"] >= 0.995, flt["aggregates"]["cosine"]  # was 0.44 (std-based scales)
    assert flt["aggregates"]["top1"]["tail"] >= 0.97
    unexplained = [f for f in flt["failures"] if not f.startswith(TOY_FP8_MISSES)]
    assert not unexplained, unexplained
    assert report["pope"]["agreement_scr"] >= 0.95 and report["pope"]["agreement_off"] >= 0.95
    assert rc == (0 if report["passed"] else 1)
