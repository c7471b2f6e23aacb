"""ONNX Runtime end to end, per family (tiny presets, fp32): convert, run, validate against the PyTorch reference."""

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
from runtimes.onnxruntime_runner import OrtVLM  # noqa: E402
from scr_export.convert import convert_to_onnx  # noqa: E402
from scr_export.reference import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]




def test_conversion_passes_the_fp32_gates(family_name, converted):
    out, report = converted(family_name)
    assert report, report.table()
    logits = report.comparisons
    assert all(c.max_rel <= 1e-4 for c in logits)
    assert report.plan_identical and report.greedy_identical and len(report.ref_tokens[0]) == 16
    assert any(c.name.startswith("decode logits x16") for c in logits)  # >= 8 teacher-forced decode steps
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["family"] == family_name
    assert {p.name for p in out.iterdir()} >= {"vision_encoder.onnx", "embed_tokens.onnx", "diagnostic.onnx",
                                               "decoder_model_merged.onnx", "manifest.json", "tokenizer.json"}
    import onnx

    for name in ("vision_encoder.onnx", "embed_tokens.onnx", "diagnostic.onnx", "decoder_model_merged.onnx"):
        assert onnx.load(str(out / name), load_external_data=False).ir_version == 10


def test_runner_on_a_new_image_matches_the_reference_and_scr_is_not_a_no_op(family_name, converted):
    out, _ = converted(family_name)
    runner = OrtVLM(out, device="cpu")
    vlm = load(TINY_PRESETS[family_name])
    image = make_image(180, 150, seed=7)
    inputs = runner.encode([[image]], ["Is there a red block?"])
    ref = generate(vlm, inputs, runner.config, max_new_tokens=16, stop_at_eos=False, keep_prefill_logits=True)
    on = runner.generate(inputs, max_new_tokens=16, stop_at_eos=False, keep_prefill_logits=True)
    off = runner.generate(inputs, scr=False, max_new_tokens=1, keep_prefill_logits=True)
    assert on.tokens.tolist() == ref.tokens.tolist()
    assert [s.tolist() for s in on.plan.sources(0)] == [s.tolist() for s in ref.plan.sources(0)]
    finite = np.abs(ref.prefill_logits) < 1e30
    rel = np.abs(on.prefill_logits - ref.prefill_logits)[finite].max() / np.abs(ref.prefill_logits[finite]).max()
    assert rel <= 1e-4
    assert not np.allclose(on.prefill_logits, off.prefill_logits), "SCR in the graph must change the logits"


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "scr_export.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["no_manifest", "corrupted_onnx", "bad_image", "newer_manifest", "missing_graph"])
def test_bad_directories_and_inputs(case, converted, tmp_path):
    src, _ = converted("llava")
    d = _copy(src, tmp_path / "d")
    image = tmp_path / "img.png"
    make_image().save(image)
    expect = {"no_manifest": "has no manifest.json", "corrupted_onnx": "ONNX Runtime cannot load",
              "bad_image": "too small", "newer_manifest": "newer than this scr-export",
              "missing_graph": "lacks diagnostic.onnx"}[case]
    if case == "no_manifest":
        (d / "manifest.json").unlink()
    elif case == "corrupted_onnx":
        (d / "decoder_model_merged.onnx").write_bytes(b"\x08\x07garbage" * 100)
    elif case == "bad_image":
        from PIL import Image

        Image.new("RGB", (1, 1)).save(image)
    elif case == "newer_manifest":
        m = json.loads((d / "manifest.json").read_text())
        m["format"] = 99
        (d / "manifest.json").write_text(json.dumps(m))
    elif case == "missing_graph":
        (d / "diagnostic.onnx").unlink()
    for command in (["run", str(d), "--image", str(image), "--prompt", "hi"], ["validate", str(d)]):
        if case == "bad_image" and command[0] == "validate":
            command += ["--image", str(image)]
        res = run_cli(*command)
        assert res.returncode == 2, (command, res.stderr)
        assert expect in res.stderr and "fix:" in res.stderr and "Traceback" not in res.stderr


def test_convert_refuses_an_existing_directory_and_leaves_nothing_on_failure(tmp_path):
    existing = tmp_path / "exists"
    existing.mkdir()
    res = run_cli("convert", "tiny-llava", "--to", "onnx", "--out", str(existing))
    assert res.returncode == 2 and "already exists" in res.stderr and "--force" in res.stderr
    res = run_cli("convert", "tiny-llava", "--to", "onnx", "--out", str(tmp_path / "x"), "--layers", "7..9")
    assert res.returncode == 2 and "starts past the decoder's last layer" in res.stderr

    def interrupt(msg):  # the user presses Ctrl-C during the graph passes
        if msg.startswith("[5/6]"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_to_onnx("tiny-llava", tmp_path / "y", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temp directory, no half-written output


@pytest.mark.parametrize("family", ["qwen2_vl", "chameleon"])
def test_fp16_export_passes_the_fp16_gates_against_the_fp32_reference(family, tmp_path):
    out, report = convert_to_onnx(TINY_PRESETS[family], tmp_path / "fp16", precision="fp16", progress=lambda m: None)
    assert report.precision == "fp16"
    assert report, report.table()
    assert all(c.cosine >= 0.999 and abs(c.norm_ratio - 1) <= 0.01 for c in report.comparisons)
    assert report.plan_jaccard >= 0.9
    assert 1e-6 < report.comparisons[0].max_abs  # judged against the fp32 model, not an fp16 copy of it
    import onnx

    dec = onnx.load(str(out / "decoder_model_merged.onnx"), load_external_data=False)
    embeds = next(i for i in dec.graph.input if i.name == "inputs_embeds")
    assert embeds.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    if family == "chameleon":
        # the VQ image tokenizer stays float32: at fp16 its nearest-code lookup picked another code for 1 of 64
        # cells of this flat-colour image; now the image tokens equal the float32 PyTorch model's
        import torch

        from scr_export.processing import load_image

        vis = onnx.load(str(out / "vision_encoder.onnx"), load_external_data=False)
        assert vis.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        runner = OrtVLM(out, device="cpu")
        inputs = runner.encode([[load_image(ROOT / "examples" / "calibration" / "scene_4.png")]], ["What?"])
        pv = inputs.array("pixel_values")
        got = runner._run("vision", {"pixel_values": pv})[0]
        with torch.no_grad():
            want = load(TINY_PRESETS["chameleon"]).model.model.get_image_tokens(torch.from_numpy(pv))
        assert np.array_equal(got.reshape(-1), want.numpy().reshape(-1))


def test_batched_prompts_with_left_padding_match_the_reference(converted):
    out, _ = converted("qwen2_vl")  # M-RoPE positions and dynamic image sizes make this the demanding case
    runner = OrtVLM(out, device="cpu")
    vlm = load(TINY_PRESETS["qwen2_vl"])
    images = [[make_image(150, 120, seed=11)], [make_image(230, 110, seed=12), make_image(120, 120, seed=13)]]
    inputs = runner.encode(images, ["A long question about the picture, please answer it?", "Compare them."])
    assert inputs.attention_mask[0].sum() != inputs.attention_mask[1].sum()  # really padded
    ref = generate(vlm, inputs, runner.config, max_new_tokens=8, stop_at_eos=False, keep_prefill_logits=True)
    got = runner.generate(inputs, max_new_tokens=8, stop_at_eos=False, keep_prefill_logits=True)
    assert got.tokens.tolist() == ref.tokens.tolist()
    assert np.array_equal(got.plan.donor, ref.plan.donor) and len(got.plan.images) == 3
    real = inputs.array("attention_mask").astype(bool)
    diff = np.abs(got.prefill_logits - ref.prefill_logits)[real]
    assert diff.max() / np.abs(ref.prefill_logits[real]).max() <= 1e-4


def test_cuda_request_without_a_gpu_is_a_clear_error(converted, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is installed here; the missing-provider message cannot be provoked")
    out, _ = converted("llava")
    image = tmp_path / "i.png"
    make_image().save(image)
    res = run_cli("run", str(out), "--image", str(image), "--prompt", "hi", "--device", "cuda")
    assert res.returncode == 2 and "CUDA execution provider is not available" in res.stderr and "fix:" in res.stderr


def test_group_query_attention_decoder_beside_the_eager_one(family_name, converted):
    """The default conversion writes the decoder twice over one weights file: eager (batches, TensorRT) and with
    ONNX Runtime's GroupQueryAttention on a shared KV buffer plus its norm fusions (one prompt, the CPU default).
    The GQA graph has no eager attention and no Concat of the cache left, keeps its SCR nodes, and the report
    written at conversion is the GQA decoder's; the eager decoder passes the same fp32 gates."""
    import onnx

    from scr_export.parity import validate_directory

    out, report = converted(family_name)
    assert report and "attention: gqa" in report.provider, report.table()
    manifest = json.loads((out / "manifest.json").read_text())
    gqa_file = manifest["graphs"]["decoder"]["gqa"]["file"]
    m = onnx.load(str(out / gqa_file), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    n_layers = manifest["decoder"]["num_layers"]
    assert ops.count("GroupQueryAttention") == n_layers and "Softmax" not in ops
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    assert all(producers[f"present.{i}.key"] == "GroupQueryAttention" for i in range(n_layers))
    assert ops.count("SCRNeighbourInject") == 2
    # ONNX Runtime's norm fusions: every RMSNorm (two a layer and the final one) is one fused node, none left as Pow
    assert ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization") == 2 * n_layers + 1
    assert "Pow" not in ops and manifest["graphs"]["decoder"]["gqa"]["fused"]
    # the rotary embedding inside the op (do_rotary) where positions are 1-D; Qwen2-VL's M-RoPE stays outside
    rotary_inside = family_name != "qwen2_vl"
    assert manifest["graphs"]["decoder"]["gqa"]["rotary_inside"] == rotary_inside
    attrs = [{a.name: a.i for a in n.attribute} for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(a.get("do_rotary", 0) == int(rotary_inside) for a in attrs)
    assert ("Neg" in ops) != rotary_inside  # rotate_half's Neg is gone with the rotary
    locations = {e.value for i in m.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"decoder_model_merged.onnx.data"}  # the eager decoder's weights, not a copy
    eager = onnx.load(str(out / "decoder_model_merged.onnx"), load_external_data=False)
    assert "GroupQueryAttention" not in {n.op_type for n in eager.graph.node}
    # the diagnostic graph keeps eager attention (it needs the probabilities)
    diag = onnx.load(str(out / "diagnostic.onnx"), load_external_data=False)
    assert "Softmax" in {n.op_type for n in diag.graph.node}
    eager_report = validate_directory(out, device="cpu", attention="eager")
    assert eager_report and "attention: eager" in eager_report.provider, eager_report.table()
    assert all(c.max_rel <= 1e-4 for c in eager_report.comparisons)


def test_one_prompt_runs_group_query_attention_and_a_batch_runs_the_eager_decoder(converted):
    out, _ = converted("qwen2_vl")
    runner = OrtVLM(out, device="cpu")
    assert runner.attention == "gqa" and "decoder" not in runner.sessions  # the eager decoder loads when needed
    vlm = load(TINY_PRESETS["qwen2_vl"])
    inputs = runner.encode([[make_image(150, 190, seed=11)]], ["Is there a red block?"])
    ref = generate(vlm, inputs, runner.config, max_new_tokens=12, stop_at_eos=False, keep_prefill_logits=True)
    got = runner.generate(inputs, max_new_tokens=12, stop_at_eos=False, keep_prefill_logits=True)
    assert "decoder" not in runner.sessions
    assert got.tokens.tolist() == ref.tokens.tolist()
    rel = np.abs(got.prefill_logits - ref.prefill_logits).max() / np.abs(ref.prefill_logits).max()
    assert rel <= 1e-4
    # two prompts of different lengths (left padding): the eager decoder, the reference's tokens and logits
    two = runner.encode([[make_image()], [make_image(150, 190, seed=11)]], ["Describe.", "Is there a red block?"])
    ref2 = generate(vlm, two, runner.config, max_new_tokens=12, stop_at_eos=False)
    got2 = runner.generate(two, max_new_tokens=12, stop_at_eos=False)
    assert "decoder" in runner.sessions
    assert got2.tokens.tolist() == ref2.tokens.tolist()
    for a, b in zip(got2.logits, ref2.logits):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    # the batch's second row is the single prompt above: the same greedy tokens from either decoder
    assert got2.tokens[1].tolist() == got.tokens[0].tolist()


def test_attention_choice_errors(tmp_path, converted):
    from scr_export.errors import SCRExportError

    out, _ = converted("llava")
    assert OrtVLM(out, device="cpu", attention="eager").attention == "eager"
    with pytest.raises(SCRExportError, match="unknown"):
        OrtVLM(out, device="cpu", attention="flash")
    eager_only, report = convert_to_onnx(TINY_PRESETS["llava"], tmp_path / "eager", attention="eager",
                                         progress=lambda m: None)
    assert report and "attention: eager" in report.provider
    assert "gqa" not in json.loads((eager_only / "manifest.json").read_text())["graphs"]["decoder"]
    with pytest.raises(SCRExportError, match="no GroupQueryAttention decoder") as exc:
        OrtVLM(eager_only, device="cpu", attention="gqa")
    assert "--attention gqa" in exc.value.fix


def test_the_registry_opens_every_directory_through_one_interface(converted, tmp_path):
    """validate and the CLI open runners through runtimes.registry: the manifest picks the runner, options that do
    not apply to it are refused, and a config whose baked-in layer ranges differ is refused, not ignored."""
    from runtimes.registry import VLMRuntime, open_runtime
    from scr_export.errors import SCRExportError

    out, _ = converted("llava")
    runner = open_runtime(out, device="cpu", attention="eager")
    assert isinstance(runner, OrtVLM) and isinstance(runner, VLMRuntime) and runner.attention == "eager"
    assert runner.float_gate() == "fp32" and runner.engine_reference(None, None) is None
    inputs = runner.encode([[make_image()]], ["Describe."])
    for bad in (dict(layers=(0, 0)), dict(diag_layers=(0, 1))):
        with pytest.raises(SCRExportError, match="built in") as exc:
            runner.generate(inputs, config=runner.config.replace(**bad), max_new_tokens=1)
        assert "convert again with --" in exc.value.fix
    res = runner.generate(inputs, config=runner.config.replace(k=2, lam=1.3), max_new_tokens=1)  # run-time knobs
    assert (res.plan.scale < 1).sum() == 2
    with pytest.raises(SCRExportError, match="not TensorRT"):
        open_runtime(out, "tensorrt")
    # the context guard: the GroupQueryAttention decoder's rotary tables end at the model's positions
    limit = json.loads((out / "manifest.json").read_text())["graphs"]["decoder"]["gqa"]["max_positions"]
    with pytest.raises(SCRExportError, match=rf"exceed the model's positions \({limit}\)") as exc:
        OrtVLM(out, device="cpu").generate(inputs, max_new_tokens=limit)
    assert "fewer new tokens" in exc.value.fix
    res = run_cli("run", str(out), "--image", str(_saved(tmp_path)), "--prompt", "hi", "--attention", "gqa",
                  "--runtime", "llamacpp")
    assert res.returncode == 2 and "GGUF" in res.stderr


def _saved(tmp_path):
    image = tmp_path / "i.png"
    make_image().save(image)
    return image


def test_run_and_validate_never_write_into_the_directory(converted, tmp_path):
    """A converted directory may be read-only on a device: run and validate leave it byte for byte as it was
    (checked by contents and times, since root ignores chmod), and validate's JSON goes where --json says."""
    import stat

    src, _ = converted("llava")
    d = _copy(src, tmp_path / "ro")

    def snapshot():
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}

    before = snapshot()
    for p in [d, *d.iterdir()]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        res = run_cli("run", str(d), "--image", str(_saved(tmp_path)), "--prompt", "hi", "--max-new-tokens", "2")
        assert res.returncode == 0, res.stderr
        report = tmp_path / "reports" / "parity.json"
        report.parent.mkdir()
        res = run_cli("validate", str(d), "--steps", "2", "--json", str(report))
        assert res.returncode == 0, res.stderr
        assert json.loads(report.read_text())["passed"]
        assert snapshot() == before
    finally:
        for p in [d, *d.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_rotary_tables_only_for_position_only_rope(monkeypatch):
    """GroupQueryAttention's cos/sin tables are precomputed: right for rope types that depend on the position alone,
    refused (rotary stays in the graph) for sequence-length-dependent ones and for Qwen2-VL's M-RoPE."""
    from scr_export.convert import rotary_tables

    fam = load(TINY_PRESETS["llava"])
    head_dim = fam.text_config.hidden_size // fam.text_config.num_attention_heads
    cos, sin = rotary_tables(fam, head_dim)
    assert cos.shape == (fam.text_config.max_position_embeddings, head_dim // 2) and cos.dtype == np.float32
    theta = fam.text_config.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(cos[7], np.cos(7 * inv), atol=1e-6)
    np.testing.assert_allclose(sin[100], np.sin(100 * inv), atol=1e-5)
    monkeypatch.setattr(fam.text_config, "rope_parameters", {**fam.text_config.rope_parameters, "rope_type": "dynamic"})
    assert rotary_tables(fam, head_dim) is None
    assert rotary_tables(load(TINY_PRESETS["qwen2_vl"]), 16) is None


def test_the_manifest_records_the_torch_free_preprocessing_settings(family_name, converted):
    """A converted directory holds what scr_export.hostproc needs: its encode, from the directory's files alone
    (manifest "host" and "model_config", tokenizer.json, tokenizer_config.json), equals transformers' encode of
    the checkpoint (ids, mask, pixels, image layouts), as the runner uses it."""
    from scr_export.hostproc import HostSettings, HostTokenizer
    from scr_export.hostproc import encode as host_encode
    from scr_export.processing import encode

    out, _ = converted(family_name)
    settings = HostSettings(**json.loads((out / "manifest.json").read_text())["host"])
    runner = OrtVLM(out, device="cpu")
    images, prompts = [[make_image(170, 120, seed=9)], [make_image(seed=10)]], ["Is there a red block?", "Hi."]
    want = encode(load(TINY_PRESETS[family_name]), images, prompts)
    got = host_encode(images, prompts, settings, HostTokenizer(out))
    assert runner.encode(images, prompts).layouts == want.layouts
    np.testing.assert_array_equal(got["input_ids"], want.input_ids.numpy())
    np.testing.assert_array_equal(got["attention_mask"], want.attention_mask.numpy())
    assert np.abs(got["pixel_values"] - want.tensors["pixel_values"].numpy().astype(np.float32)).max() <= 1e-6
