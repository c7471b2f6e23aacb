"""The TensorRT path. Everywhere: the plugin's plain-Python rules, the PTX it embeds, the optimisation profiles
(checked against every shape the shared runner feeds), build_engines.sh, and `convert --to trt` where TensorRT is
missing. Where TensorRT imports and a GPU is visible (never in CI): engine build, plugin chosen, validate passing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

import onnxruntime  # noqa: E402,F401  (installed by the README's test command: a failed import fails)

from conftest import TINY_PRESETS, make_image  # noqa: E402
from runtimes.kernels import build  # noqa: E402
from runtimes.tensorrt import plugin_rules as rules  # noqa: E402
from runtimes.tensorrt.profiles import Limits, covers, model_shape, resolve  # noqa: E402
from scr_export.errors import SCRExportError  # noqa: E402

_CONVERTED: dict = {}


@pytest.fixture(scope="module")
def trt_dir(tmp_path_factory):
    def get(family: str, **limits):
        key = (family, tuple(sorted(limits.items())))
        if key not in _CONVERTED:
            from runtimes.tensorrt.convert import convert_to_trt

            out = tmp_path_factory.mktemp("trt") / family
            _CONVERTED[key] = convert_to_trt(TINY_PRESETS[family], out, limits=Limits(**limits),
                                             progress=lambda m: None, build="never")
        return _CONVERTED[key]

    return get


# -- plugin rules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, path", [("10.3.0.30", "function"), ("10.7.0", "function"), ("10.12.0", "function"),
                                           ("10.13.0.35", "plugin"), ("10.16.1.11", "plugin"), ("11.4.0.106", "plugin")])
def test_which_tensorrt_gets_the_plugin(version, path):
    assert rules.scr_path_for(version) == path


def test_tensorrt_9_is_refused_and_junk_versions_are_errors():
    with pytest.raises(ValueError, match="older than 10.0"):
        rules.scr_path_for("9.2.0")
    with pytest.raises(ValueError, match="not a TensorRT version"):
        rules.scr_path_for("latest")


# the kernel source is the other side of the plugin's contract: its entry points, their types and launch bound
KERNEL_SOURCE = build.KERNEL_CU.read_text()
CUDA_TYPES = {"float": ("FP32", "float32", 4), "__half": ("FP16", "float16", 2),
              "__nv_bfloat16": ("BF16", "bfloat16", 2)}
KERNEL_ENTRIES = {name: (CUDA_TYPES[t], int(vec))
                  for name, t, vec in re.findall(r"^SCR_ENTRY\((\w+), (\w+), (\d+)\)", KERNEL_SOURCE, re.M)}
LAUNCH_BOUND = int(re.search(r"__launch_bounds__\((\d+)\)", KERNEL_SOURCE).group(1))


def test_type_combinations_are_what_the_cuda_entry_points_take():
    # the entry macro's parameters: h (T), donor, scale, weight, int seq, int dim, out (T)
    macro = re.search(r"#define SCR_ENTRY\(NAME, T, VEC\).*?NAME\((.*?)\)", KERNEL_SOURCE, re.S).group(1)
    params = [re.sub(r"\s+", " ", p.replace("\\", "")).strip() for p in macro.split(",")]
    ctype = {"T": None, "int64_t": "INT64", "float": "FP32"}
    kinds = [ctype[re.match(r"(?:const )?(\w+)", p).group(1)] for p in params if not p.startswith("int ")]
    assert len(kinds) == 5 and kinds[0] is None and kinds[-1] is None  # hidden and out are the kernel's T
    kernel_types = {t for (t, _, _), _ in KERNEL_ENTRIES.values()}
    want = {(t, kinds[1], kinds[2], kinds[3], t) for t in kernel_types}
    combos = rules.type_combinations()
    assert len(combos) == len(set(combos)) and set(combos) == want
    assert {rules.TRT_TYPE_NAMES[c[0]] for c in combos} == {"float32", "float16", "bfloat16"}


def test_shape_rule():
    assert rules.output_shape((2, 7, 64), (2, 7), (2, 7), (2, 7)) == (2, 7, 64)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        rules.output_shape((7, 64), (2, 7), (2, 7), (2, 7))
    with pytest.raises(ValueError, match=r"scale must be \[B, T\]"):
        rules.output_shape((2, 7, 64), (2, 7), (2, 7, 1), (2, 7))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dim", [None, 1, 8, 64, 70, 100, 2048, 4096, 5120, 8191])
def test_aot_launch_fits_the_kernel_source(dtype, dim):
    launch = rules.aot_launch(dtype, dim)
    (trt_type, kernel_dtype, elem), vec = KERNEL_ENTRIES[launch["entry"]]  # an entry point the .cu defines
    assert kernel_dtype == dtype
    # the vectorised entry reads dim / VEC packs of 16 bytes: only for rows that split into whole packs, and then always
    if vec > 1:
        assert vec * elem == 16 and dim is not None and dim % vec == 0
    else:
        assert dim is None or dim % (16 // elem) != 0
    # whole warps, within the entry's __launch_bounds__, enough threads for one pass over the row where the bound
    # allows, and no warp that would have nothing to do
    block = launch["block_x"]
    assert block % 32 == 0 and 32 <= block <= LAUNCH_BOUND
    if dim is not None:
        packs = -(-dim // vec)
        assert block >= min(packs, LAUNCH_BOUND) and (block == 32 or block - 32 < packs)
    else:
        assert block == LAUNCH_BOUND  # any D: the element-wise entry at its bound
    assert launch["extra_args"] == ("seq", "dim")  # the entry's int parameters, in order
    assert re.search(r"float\* __restrict__ weight, int seq, int dim,", KERNEL_SOURCE)


def test_ptx_choice_picks_the_newest_arch_the_gpu_can_jit(tmp_path):
    files = {a: tmp_path / rules.ptx_file_name(a) for a in ("87", "89", "90")}
    assert rules.choose_ptx((8, 7), files)[0] == "87"   # Orin
    assert rules.choose_ptx((8, 9), files)[0] == "89"   # Ada
    assert rules.choose_ptx((9, 0), files)[0] == "90"   # Hopper
    assert rules.choose_ptx((12, 0), files)[0] == "90"  # newer GPUs JIT the newest PTX
    with pytest.raises(FileNotFoundError, match=r"build-ops --ptx 86"):
        rules.choose_ptx((8, 6), files)


@pytest.mark.skipif(not build.nvcc_available(), reason="nvcc (CUDA toolkit) is not installed here")
def test_every_aot_entry_exists_in_the_ptx_with_the_aot_parameter_order(tmp_path):
    text = build.build_ptx("87", out=tmp_path / "k.ptx").read_text()
    entries = rules.ptx_entries(text)
    for dtype in ("float32", "float16", "bfloat16"):
        for dim in (None, 64, 70, 4096):
            assert rules.aot_launch(dtype, dim)["entry"] in entries
    # TensorRT's AOT contract: input pointers, then int32 scalars, then output pointers
    for name in entries:
        params = re.search(rf"\.entry {name}\((.*?)\)", text, re.S).group(1)
        kinds = re.findall(r"\.param \.(\w+)", params)
        assert kinds == ["u64"] * 4 + ["u32"] * 2 + ["u64"], (name, kinds)


def test_plugin_loader_reads_the_ptx_of_a_converted_directory(trt_dir):
    from runtimes.tensorrt.plugin import available_ptx

    out, _, _ = trt_dir("llava")
    manifest = json.loads((out / "manifest.json").read_text())
    ptx = available_ptx(out / manifest["tensorrt"]["ptx_dir"])
    if not build.nvcc_available():
        assert ptx == {} and manifest["tensorrt"]["ptx"] == {}
        pytest.skip("no nvcc here: the directory carries no PTX (regenerated on the target)")
    assert sorted(ptx) == ["87", "89", "90"]
    arch, path = rules.choose_ptx((8, 7), ptx)
    assert "scr_neighbour_inject_f16_v8" in rules.ptx_entries(path.read_text())
    for arch, info in manifest["tensorrt"]["ptx"].items():
        assert all(e["spill_stores"] == 0 and e["spill_loads"] == 0 for e in info["entries"].values())


# -- profiles ----------------------------------------------------------------------------------------------------

def _fed_shapes(runner, inputs):
    """Every (graph, {input: shape}) the shared runner feeds for a plan + greedy generation."""
    seen = []
    original = runner._run

    def spy(name, feed, outputs=None):
        wanted = {i.name for i in runner.sessions[name].get_inputs()}
        seen.append((name, {k: tuple(v.shape) for k, v in feed.items() if k in wanted}))
        return original(name, feed, outputs)

    runner._run = spy
    runner.generate(inputs, max_new_tokens=6, stop_at_eos=False)
    return seen


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl", "chameleon"])
def test_profiles_cover_everything_the_runner_feeds(family, trt_dir):
    from runtimes.onnxruntime_runner import OrtVLM

    out, report, engines = trt_dir(family)
    assert report and engines is None
    manifest = json.loads((out / "manifest.json").read_text())
    profiles = manifest["tensorrt"]["profiles"]
    assert set(profiles) == {"vision", "embed_tokens", "diagnostic", "decoder"}
    assert len(profiles["decoder"]) == 2  # prefill, decode
    for graph, plist in profiles.items():
        for p in plist:
            for name, s in p.items():
                assert all(lo <= o <= hi for lo, o, hi in zip(s["min"], s["opt"], s["max"])), (graph, name, s)
    runner = OrtVLM(out, device="cpu")
    inputs = runner.encode([[make_image()]], ["What is in the picture?"])
    feeds = _fed_shapes(runner, inputs)
    assert {g for g, _ in feeds} == set(profiles)
    for graph, shapes in feeds:
        assert any(covers(p, shapes) for p in profiles[graph]), (graph, shapes, profiles[graph])
    # the decoder's prefill lands in profile 0 and every decode step in profile 1
    dec = [s for g, s in feeds if g == "decoder"]
    assert covers(profiles["decoder"][0], dec[0]) and not covers(profiles["decoder"][1], dec[0])
    assert all(covers(profiles["decoder"][1], s) and not covers(profiles["decoder"][0], s) for s in dec[1:])


def test_limits_size_the_profiles_and_bad_limits_are_clear_errors(trt_dir):
    from scr_export.loading import load_vlm

    shape = model_shape(load_vlm("tiny-llava"))
    lim = resolve(Limits(max_batch=2, max_images=3), shape)
    assert lim.max_seq >= 3 * shape.image_tokens + shape.text_tokens
    with pytest.raises(SCRExportError, match="cannot hold"):
        resolve(Limits(max_seq=32), shape)
    with pytest.raises(SCRExportError, match="exceeds the model's"):
        resolve(Limits(max_seq=10**6), shape)
    with pytest.raises(SCRExportError, match="not positive"):
        resolve(Limits(max_batch=0), shape)
    out, _, _ = trt_dir("llava", max_batch=2, max_images=2, max_seq=300)
    profiles = json.loads((out / "manifest.json").read_text())["tensorrt"]["profiles"]
    assert profiles["decoder"][0]["inputs_embeds"]["max"][:2] == [2, 300]
    assert profiles["decoder"][1]["past_key_values.0.key"]["max"][2] == 299
    assert profiles["vision"][0]["pixel_values"]["max"][0] == 4  # 2 prompts × 2 images


# -- build_engines.sh --------------------------------------------------------------------------------------------

def _script_shapes(text: str) -> dict[str, dict[str, dict[str, tuple[int, ...]]]]:
    """{onnx file: {"min"|"opt"|"max": {input: shape}}}, read back from the trtexec lines of build_engines.sh."""
    out = {}
    for file, block in re.findall(r'--onnx="\$DIR/([\w.]+)"(.*?)--skipInference', text, re.S):
        shapes = {}
        for key in ("min", "opt", "max"):
            arg = re.search(rf"--{key}Shapes=(\S+)", block).group(1).strip("'")
            shapes[key] = {name: tuple(int(v) for v in dims.split("x"))
                           for name, dims in (item.rsplit(":", 1) for item in arg.split(","))}
        out[file] = shapes
    return out


def _onnx_inputs(path: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


@pytest.mark.parametrize("family, limits", [("llava", dict(max_batch=2, max_images=2, max_seq=300)),
                                            ("qwen2_vl", {})])
def test_build_script_shapes_fit_the_graphs_the_model_and_the_limits(family, limits, trt_dir):
    from conftest import load

    out, _, _ = trt_dir(family, **limits)
    script = out / "build_engines.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.count("--stronglyTyped") == 4
    got = _script_shapes(text)
    manifest = json.loads((out / "manifest.json").read_text())
    files = {g: info["file"] for g, info in manifest["graphs"].items()}
    assert set(got) == set(files.values())

    for graph, file in files.items():
        shapes = got[file]
        # every dynamic input of the ONNX file has a range; static dimensions are the file's own
        dims = {n: d for n, d in _onnx_inputs(out / file).items() if not all(isinstance(v, int) for v in d)}
        assert set(shapes["min"]) == set(shapes["opt"]) == set(shapes["max"]) == set(dims), graph
        for name, d in dims.items():
            for key in ("min", "opt", "max"):
                assert len(shapes[key][name]) == len(d)
                assert all(v == s for v, s in zip(shapes[key][name], d) if isinstance(s, int)), (graph, name, key)
            assert all(lo <= o <= hi for lo, o, hi in zip(shapes["min"][name], shapes["opt"][name],
                                                          shapes["max"][name])), (graph, name)
        # one trtexec profile covering all of the manifest's profiles of this graph (decoder: prefill + decode)
        plist = manifest["tensorrt"]["profiles"][graph]
        for name in dims:
            assert shapes["min"][name] == tuple(min(p[name]["min"][i] for p in plist)
                                                for i in range(len(dims[name])))
            assert shapes["max"][name] == tuple(max(p[name]["max"][i] for p in plist)
                                                for i in range(len(dims[name])))
            assert shapes["opt"][name] == tuple(plist[0][name]["opt"])

    # the numbers, from the model's own config and the limits asked for
    vlm = load(TINY_PRESETS[family])
    tc = vlm.text_config
    hidden, kv = tc.hidden_size, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or hidden // tc.num_attention_heads
    batch, images = limits.get("max_batch", 1), limits.get("max_images", 1)
    dec, emb = got[files["decoder"]], got[files["embed_tokens"]]
    seq = dec["max"]["inputs_embeds"][1]
    if "max_seq" in limits:
        assert seq == limits["max_seq"]
    assert seq <= tc.max_position_embeddings
    assert dec["min"]["inputs_embeds"] == (1, 1, hidden) and dec["max"]["inputs_embeds"] == (batch, seq, hidden)
    assert emb["min"]["input_ids"] == (1, 1) and emb["max"]["input_ids"] == (batch, seq)
    for name in ("scr_donor", "scr_scale", "scr_weight"):
        assert dec["min"][name] == (1, 1) and dec["max"][name] == (batch, seq)
    assert dec["max"]["attention_mask"] == (batch, seq)
    past = sorted(n for n in dec["max"] if n.startswith("past_key_values."))
    assert past == sorted(f"past_key_values.{i}.{kind}" for i in range(vlm.num_layers) for kind in ("key", "value"))
    for name in past:  # prefill from an empty cache up to seq - 1 cached positions before the last decode step
        assert dec["min"][name] == (1, kv, 0, head_dim) and dec["max"][name] == (batch, kv, seq - 1, head_dim)
    diag = got[files["diagnostic"]]
    last_diag = vlm.scr_config().diag_layers[1]
    assert {n for n in diag["max"] if n.startswith("past_key_values.")} <= {
        f"past_key_values.{i}.{kind}" for i in range(last_diag + 1) for kind in ("key", "value")}
    assert diag["max"]["inputs_embeds"] == (batch, seq, hidden)
    assert "scr_query_mask" not in diag["max"]  # the host reduces the per-layer rows (scr_export.attention_map)
    vision = got[files["vision"]]
    vc = vlm.config.vision_config
    if family == "llava":
        side = vc.image_size
        assert vision["min"]["pixel_values"] == (1, 3, side, side)
        assert vision["max"]["pixel_values"] == (batch * images, 3, side, side)
    else:  # Qwen2-VL: flattened patches of C x temporal x patch x patch, whole 2x2 merge blocks
        merge = vc.spatial_merge_size
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        lo, hi = vision["min"]["pixel_values"], vision["max"]["pixel_values"]
        assert lo[1] == hi[1] == width and lo[0] == merge * merge and hi[0] % (merge * merge) == 0
        assert dec["min"]["position_ids"] == (3, 1, 1) and dec["max"]["position_ids"] == (3, batch, seq)


def test_build_script_reports_a_missing_trtexec_and_a_bad_mode(trt_dir):
    out, _, _ = trt_dir("llava")
    env = dict(os.environ, TRTEXEC="/nonexistent/trtexec")
    r = subprocess.run([str(out / "build_engines.sh"), "trtexec"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "trtexec not found" in r.stderr
    r = subprocess.run([str(out / "build_engines.sh"), "fast"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    assert not (out / "engines").exists()


# -- convert / run / validate without TensorRT -------------------------------------------------------------------

def _cli(*args):
    return subprocess.run(["scr-export", *args], capture_output=True, text=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here: the engines can be built")
def test_without_tensorrt_convert_says_so_and_run_points_at_the_build_script(trt_dir, tmp_path):
    out, _, _ = trt_dir("llava")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["engines"] is None and manifest["tensorrt"]["not_built_because"]
    img = tmp_path / "img.png"
    make_image().save(img)
    r = _cli("run", str(out), "--image", str(img), "--prompt", "Describe.")
    assert r.returncode == 2
    assert "have not been built" in r.stderr and "build_engines.sh" in r.stderr
    # the same directory runs in ONNX Runtime on request, with the same graphs
    r = _cli("run", str(out), "--image", str(img), "--prompt", "Describe.", "--runtime", "onnx",
             "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    r = _cli("convert", "tiny-llava", "--to", "trt", "--out", str(tmp_path / "x"), "--build-engines", "always")
    assert r.returncode == 2 and "cannot build TensorRT engines here" in r.stderr
    assert not (tmp_path / "x").exists()
    r = _cli("convert", "tiny-llava", "--to", "trt", "--out", str(tmp_path / "y"), "--max-seq", "16")
    assert r.returncode == 2 and "cannot hold" in r.stderr
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y-*"))


def test_runtime_choice_errors():
    from scr_export.manifest import pick_runtime

    assert pick_runtime({"tensorrt": {}}, "auto") == "tensorrt"
    assert pick_runtime({"tensorrt": {}}, "onnx") == "onnx"
    assert pick_runtime({}, "auto") == "onnx"
    assert pick_runtime({"gguf": {}}, "auto") == "llamacpp"
    with pytest.raises(SCRExportError, match="not TensorRT"):
        pick_runtime({}, "tensorrt")
    with pytest.raises(SCRExportError, match="GGUF"):
        pick_runtime({"gguf": {}}, "tensorrt")


# -- where TensorRT imports and a GPU is visible (skipped in CI) -------------------------------------------------

def _tensorrt_gpu():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it cannot be installed on CI machines)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.gpu
def test_engines_build_with_the_plugin_and_validate_passes(tmp_path):
    _tensorrt_gpu()
    import tensorrt as trt

    from runtimes.tensorrt.convert import convert_to_trt
    from scr_export.parity import validate_directory

    out, report, engines = convert_to_trt("tiny-llava", tmp_path / "t", progress=print, build="always")
    assert engines is not None
    expected = rules.scr_path_for(trt.__version__)
    assert engines["graphs"]["decoder"]["scr_path"] == expected
    trt_report = validate_directory(out, runtime="tensorrt")
    assert trt_report, trt_report.table()
    assert np.isfinite(trt_report.scr_effect_cosine) and trt_report.plan_jaccard >= 0.9
