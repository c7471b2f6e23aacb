"""Conversion at real size (issue 20): graphs traced without weights and filled tensor by tensor from the checkpoint,
no weight stored twice, bounded memory, and bad checkpoints refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ["tiny-llava", "tiny-qwen2-vl", "tiny-internvl", "tiny-chameleon"]


def cli(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "scr_export.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _feeds(session, batch=2, seq=5, past=3, seed=0):
    """Inputs for a decoder-like session (``seq`` new tokens after ``past``, random past KV), from its own inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "inputs_embeds":
            feeds[i.name] = rng.standard_normal((batch, seq, i.shape[2])).astype(np.float32)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, past + seq), np.int64)
        elif i.name == "position_ids":
            pos = np.broadcast_to(np.arange(past, past + seq), (batch, seq))
            feeds[i.name] = np.ascontiguousarray(np.broadcast_to(pos, (3, batch, seq)) if len(i.shape) == 3 else pos)
        else:  # past_key_values.*
            feeds[i.name] = rng.standard_normal((batch, i.shape[1], past, i.shape[3])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("preset", FAMILIES)
def test_streamed_decoder_equals_the_in_memory_export(preset, tmp_path):
    """The decoder traced on the meta device with lazily read weights computes exactly what the export of the
    loaded model computes (same logits and KV, bit for bit), for every family."""
    import onnxruntime as ort

    from scr_export.loading import load_vlm
    from scr_export.onnx_export.decoder import export_decoder

    export_decoder(load_vlm(preset), tmp_path / "memory.onnx")
    streamed = load_vlm(preset, weights=False)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # no weight was read to trace
    export_decoder(streamed, tmp_path / "streamed.onnx")
    a = ort.InferenceSession(str(tmp_path / "memory.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "streamed.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(a)
    for x, y, out in zip(a.run(None, feeds), b.run(None, feeds), a.get_outputs()):
        np.testing.assert_array_equal(x, y, err_msg=f"{preset}: {out.name}")


def _saved_preset(out: Path, dtype: str, shard: str, preset: str = "tiny-llava") -> Path:
    """The preset saved in ``dtype`` in shards of ``shard`` (as llava-hf ships 7B), with its processing files."""
    import shutil

    import torch

    from scr_export.loading import load_vlm

    fam = load_vlm(preset)
    fam.model.to(getattr(torch, dtype)).save_pretrained(out, max_shard_size=shard)
    for f in fam.path.iterdir():
        if f.suffix in (".json", ".jinja") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory):
    return _saved_preset(tmp_path_factory.mktemp("ckpt") / "tiny-llava-fp16", "float16", "150KB")


def _data_bytes(directory: Path, graph: str) -> dict[str, int]:
    """Bytes of each initializer of ``graph`` by data type name, and which files hold them."""
    m = onnx.load(str(directory / graph), load_external_data=False)
    by: dict[str, int] = {}
    for t in m.graph.initializer:
        size = next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))
        name = onnx.TensorProto.DataType.Name(t.data_type)
        by[name] = by.get(name, 0) + size
    return by


def test_fp16_checkpoint_stays_fp16_and_no_weight_is_written_twice(fp16_ckpt, tmp_path):
    """An fp16 checkpoint converts to an fp16 decoder whose weights are written once (the diagnostic graph names the
    decoder's file), the token table stays fp16 even in an fp32 directory, and the shared-weights diagnostic graph
    gives exactly the maps a copy with its own weights gives."""
    import onnxruntime as ort

    from graph_passes.io import load_model, save_model

    ckpt_bytes = sum(f.stat().st_size for f in fp16_ckpt.glob("*.safetensors"))
    out16 = tmp_path / "fp16"
    res = cli("convert", str(fp16_ckpt), "--to", "onnx", "--precision", "fp16", "--out", str(out16))
    assert res.returncode == 0, res.stderr[-3000:]
    for graph in ("decoder_model_merged.onnx", "embed_tokens.onnx"):
        assert set(_data_bytes(out16, graph)) <= {"FLOAT16", "INT64", "FLOAT", "INT32", "BOOL"}, graph
        assert _data_bytes(out16, graph).get("FLOAT", 0) < 0.02 * ckpt_bytes, graph  # only small tables widened
    diag = onnx.load(str(out16 / "diagnostic.onnx"), load_external_data=False)
    locations = {e.value for t in diag.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"decoder_model_merged.onnx.data"} and not (out16 / "diagnostic.onnx.data").exists()
    data = sum(f.stat().st_size for f in out16.glob("*.onnx.data"))
    assert data < 1.1 * ckpt_bytes, (data, ckpt_bytes)  # every weight once, at the checkpoint's width

    out32 = tmp_path / "fp32"
    res = cli("convert", str(fp16_ckpt), "--to", "onnx", "--no-validate", "--out", str(out32))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "NOT validated" in res.stdout
    assert json.loads((out32 / "manifest.json").read_text())["parity"]["status"] == "not validated"
    embed = _data_bytes(out32, "embed_tokens.onnx")
    assert embed.get("FLOAT16", 0) > 0 and embed.get("FLOAT", 0) == 0  # the table at the checkpoint's width
    run = cli("run", str(out32), "--image", "examples/red_car.png", "--prompt", "What?", "--max-new-tokens", "1")
    assert run.returncode == 0 and run.stderr.count("converted with --no-validate") == 1, run.stderr[-2000:]

    own = tmp_path / "own"
    own.mkdir()
    save_model(load_model(out32 / "diagnostic.onnx"), own / "diagnostic.onnx")
    assert (own / "diagnostic.onnx.data").stat().st_size > 0
    shared = ort.InferenceSession(str(out32 / "diagnostic.onnx"), providers=["CPUExecutionProvider"])
    copied = ort.InferenceSession(str(own / "diagnostic.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(shared, batch=1, seq=9, past=0, seed=1)  # a prefill: 9 tokens, empty past
    np.testing.assert_array_equal(shared.run(None, feeds)[0], copied.run(None, feeds)[0])


def test_gguf_from_fp16_checkpoint_is_written_in_fp16(fp16_ckpt, tmp_path):
    """--to gguf from an fp16 checkpoint: the decoder GGUF is written f16 (never an f32 copy), --quant f16 is that
    file itself, and the manifest says so."""
    import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
    import gguf

    out = tmp_path / "g"
    res = cli("convert", str(fp16_ckpt), "--to", "gguf", "--quant", "f16", "--no-validate", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    reader = gguf.GGUFReader(str(out / "model-f16.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"  # vectors stay f32, as llama.cpp's converter writes them
    assert not list(out.rglob("*f32*.gguf"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _saved_preset(tmp_path_factory.mktemp("sharded") / "sharded", "float32", "200KB")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["missing_shard", "index_points_nowhere", "wrong_shape", "missing_shard_gguf"])
def test_bad_checkpoints_are_refused_before_anything_is_written(case, sharded, tmp_path):
    ckpt = _copy(sharded, tmp_path / "ckpt")
    shards = sorted(ckpt.glob("model-*.safetensors"))
    assert len(shards) >= 3
    to = ["--to", "onnx"]
    if case in ("missing_shard", "missing_shard_gguf"):
        shards[1].unlink()
        (ckpt / "model.safetensors.index.json").unlink()
        expect = shards[1].name
        to = ["--to", "gguf"] if case == "missing_shard_gguf" else to
    elif case == "index_points_nowhere":
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        key = next(iter(index["weight_map"]))
        index["weight_map"][key] = "model-99999-of-99999.safetensors"
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        expect = "model-99999-of-99999.safetensors"
    else:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["text_config"]["intermediate_size"] += 32
        (ckpt / "config.json").write_text(json.dumps(cfg))
        expect = "mlp.gate_proj.weight"
    out = tmp_path / "out"
    res = cli("convert", str(ckpt), *to, "--out", str(out))
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expect in errors[0], res.stderr[-2000:]
    assert "fix:" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no staging directory left


def test_too_little_disk_is_refused_before_writing(sharded, tmp_path, monkeypatch):
    """The free space is checked against the expected bytes before the export writes anything."""
    import shutil
    from collections import namedtuple

    from scr_export.convert import convert_to_onnx
    from scr_export.errors import SCRExportError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "out"
    with pytest.raises(SCRExportError) as err:
        convert_to_onnx(str(sharded), out, progress=lambda m: None)
    assert "GiB free" in err.value.problem and "larger disk" in err.value.fix
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_conversion_memory_is_bounded_by_the_checkpoint(tmp_path):
    """What each route's peak RSS grows by, from a few-MB model to a ~240 MB fp16 one of the same shape family,
    stays under its bound in multiples of the checkpoint bytes added (the issue's targets: 1.5x for fp16, int4 and
    GGUF, 2.5x for fp32; before streaming the growth was 7x for fp32 and int4 ONNX, 9x for Q4_0). The difference
    takes out what does not grow with the weights (the interpreter, the libraries, the exporter's tracing)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import convert_scale

    small = convert_scale.build_checkpoint(tmp_path / "small", 2, size="smoke")
    big = convert_scale.build_checkpoint(tmp_path / "big", 2, size="test")
    added = convert_scale.weight_bytes(big) - convert_scale.weight_bytes(small)
    assert 150e6 < added < 400e6
    for route, bound in (("fp32", 2.5), ("fp16", 1.5), ("int4", 1.5), ("q4_0", 1.5)):
        peaks = []
        for ckpt in (small, big):
            r = convert_scale.run_route(ckpt, route, tmp_path / f"{route}-{ckpt.name}", 2, validate=False)
            assert r["rc"] == 0, r["tail"]
            peaks.append(r["peak_rss"])
        growth = (peaks[1] - peaks[0]) / added
        assert growth <= bound, (route, [p / 1e6 for p in peaks], added / 1e6, growth)


def test_convert_scale_benchmark_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert_scale.py"), "--smoke", "--work",
                          str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "fp32 1L  peak RSS" in res.stdout and "q8_0 1L  peak RSS" in res.stdout and "LLaVA-1.5-7B" in res.stdout


def test_the_memory_guard_refuses_an_input_that_would_not_fit(tmp_path):
    """An input whose attention transient exceeds the memory available is refused before anything runs (exit 2,
    one error line with the estimate and what is available, a fix that names a size), by `run` (torch-free) and by
    the PyTorch reference (`generate`); the estimate is the arithmetic of the docstring."""
    from types import SimpleNamespace

    from scr_export.memory_guard import estimate

    fam = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(num_heads=16, embed_dim=1280)),
                          text_config=SimpleNamespace(num_attention_heads=12), vision_attention="eager")
    est = estimate(fam, {"image_grid_thw": np.array([[1, 92, 68]]), "input_ids": np.zeros((1, 1600), np.int64)})
    assert est["bytes"] == 2 * 16 * 6256**2 * 4 and est["patches"] == 6256  # 5.0 GB: scores and probabilities
    fam.vision_attention = "sdpa-above"  # the PyTorch reference: torch's flash SDPA above 1 GiB, eager below
    est = estimate(fam, {"image_grid_thw": np.array([[1, 92, 68]])})
    assert est["bytes"] == 4 * 1280 * 6256 * 4 and est["cost"] == ("linear", 4 * 1280 * 4)
    est = estimate(fam, {"image_grid_thw": np.array([[1, 40, 40]])})  # 1600 patches: 0.33 GB eager, kept eager
    assert est["bytes"] == 2 * 16 * 1600**2 * 4
    fam.vision_attention = "eager"
    est = estimate(fam, {"input_ids": np.zeros((2, 4000), np.int64)})
    assert est["bytes"] == 2 * 2 * 12 * 4000**2 * 4 and "decoder" in est["what"]

    out = tmp_path / "q"
    assert cli("convert", "tiny-qwen2-vl", "--to", "onnx", "--no-validate", "--out", str(out)).returncode == 0
    env_cap = {**os.environ, "PYTHONPATH": str(ROOT), "SCR_EXPORT_MEMORY_GB": "0.00001"}
    for argv in (["run", str(out)], ["generate", "tiny-qwen2-vl"]):
        res = subprocess.run([sys.executable, "-m", "scr_export.cli", *argv, "--image", "examples/red_car.png",
                              "--prompt", "What?", "--max-new-tokens", "1"], cwd=ROOT, capture_output=True, text=True,
                             env=env_cap, timeout=600)
        assert res.returncode == 2, res.stderr[-2000:]
        errors = [line for line in res.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and "GB is available" in errors[0], res.stderr
        # the largest transient names the fix: the vision attention a size that fits, the decoder's a shorter prompt
        assert ("patches" in errors[0] and "megapixels" in res.stderr) or (
            "prompt tokens" in errors[0] and "shorter prompt" in res.stderr), res.stderr
        assert "Traceback" not in res.stderr
    ok = cli("run", str(out), "--image", "examples/red_car.png", "--prompt", "What?", "--max-new-tokens", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]  # the machine's own memory: the same input runs


def test_photo_memory_benchmark_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "photo_memory.py"), "--smoke", "--work",
                          str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "run, 8 tokens: rc 0" in res.stdout and "validate, 8 steps: rc" in res.stdout
