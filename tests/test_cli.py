"""The CLI as a user runs it: README examples, pictures, and bad input (clear message, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def run(args, cwd=ROOT, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "scr_export.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def readme_cli_examples():
    block = README.split("<!-- cli-examples")[1].split("```bash")[1].split("```")[0]
    return [line for line in block.strip().splitlines() if line.startswith("scr-export")]


def readme_main_job():
    setup = README.split("## Set up")[1].split("```bash")[1].split("```")[0]
    return setup.strip().split("&&")[-1].strip()


@pytest.fixture(scope="module")
def readme_cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")  # the examples build on each other (convert, then run, validate)


def _flag(args, name, default=None):
    return args[args.index(name) + 1] if name in args else default


def _api_text(args, cwd):
    """What the Python API generates for a README ``generate`` / ``run`` line (greedy decoding is deterministic)."""
    from conftest import load
    from scr_export.processing import encode, load_image

    image, prompt = load_image(_flag(args, "--image")), _flag(args, "--prompt")
    steps, scr = int(_flag(args, "--max-new-tokens", 32)), "--no-scr" not in args
    if args[0] == "generate":
        from scr_export.reference import generate

        fam = load(args[1])
        overrides = {key: cast(_flag(args, flag)) for flag, key, cast in
                     (("--k", "k", int), ("--lambda", "lam", float), ("--layers", "layers", str)) if flag in args}
        cfg = fam.scr_config(**overrides)
        return generate(fam, encode(fam, [[image]], [prompt]), cfg, scr=scr, max_new_tokens=steps).texts[0]
    from scr_export.manifest import pick_runtime, read_manifest

    directory = cwd / args[1]
    if pick_runtime(read_manifest(directory), _flag(args, "--runtime", "auto")) == "llamacpp":
        from runtimes.llamacpp.runner import LlamaCppVLM

        runner = LlamaCppVLM(directory)
    else:
        from runtimes.onnxruntime_runner import OrtVLM

        runner = OrtVLM(directory, device="cpu")
    return runner.generate(runner.encode([[image]], [prompt]), scr=scr, max_new_tokens=steps).texts[0]


@pytest.mark.parametrize("line", readme_cli_examples())
def test_readme_cli_examples_run(line, readme_cwd):
    tmp_path = readme_cwd
    args = shlex.split(line)[1:]
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    res = run(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    command = args[0]
    if command in ("generate", "run"):
        # stdout is exactly the generated text (random tiny models may emit only whitespace, so compare, not test
        # for letters), and stderr says what SCR did
        assert res.stdout == _api_text(args, tmp_path) + "\n", (res.stdout, res.stderr)
        steps = int(_flag(args, "--max-new-tokens", 32))
        made = int(re.search(r"; (\d+) tokens in", res.stderr).group(1))
        assert 1 <= made <= steps
        if "--no-scr" in args:
            assert "no SCR;" in res.stderr and "sources [" not in res.stderr
        else:
            cfg = json.loads(re.search(r"SCR (\{.*?\});", res.stderr).group(1).replace("'", '"'))
            sources = json.loads(re.search(r"sources (\[[\d, ]*\])", res.stderr).group(1))
            assert len(sources) == len(set(sources)) == cfg["k"]
            if "--k" in args:
                assert cfg["k"] == int(_flag(args, "--k")) and cfg["lambda"] == float(_flag(args, "--lambda"))
                assert cfg["layers"] == [int(v) for v in _flag(args, "--layers").split("..")]
    elif command == "explain":
        out = tmp_path / args[args.index("--out") + 1]
        assert res.stdout.strip() == args[args.index("--out") + 1] and out.is_file()
        assert Image.open(out).size[0] >= 640
        assert re.search(r"credit entropy \d+\.\d+ nats; \d+ sources", res.stderr)
    elif command == "inspect":
        assert re.search(r"^family\s+qwen2_vl$", res.stdout, re.M) and re.search(r"^decoder_layers\s+\d+$", res.stdout, re.M)
    elif command in ("convert", "validate"):
        assert "PASS" in res.stdout and "FAIL" not in res.stdout, res.stdout
    elif command == "build-ops":
        lib = Path(re.search(r"^cpu\s+(\S+)$", res.stdout, re.M).group(1))
        assert lib.is_file() and lib.suffix == ".so"
    else:
        assert command == "--version" and re.fullmatch(r"scr-export \d+\.\d+\.\d+\S*\n", res.stdout), res.stdout


def test_readme_main_job_writes_a_sensible_picture(tmp_path):
    line = readme_main_job()
    assert line.startswith("scr-export explain small-llava")
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in shlex.split(line)[1:]]
    res = run(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    picture = Image.open(tmp_path / "explain.png").convert("RGB")
    assert picture.size[0] >= 576 and picture.size[1] > 576
    # the source markers (cyan) are drawn: 32 sources of a 24×24 grid
    pixels = picture.load()
    cyan = sum(1 for x in range(0, picture.size[0], 2) for y in range(0, picture.size[1], 2)
               if pixels[x, y] == (0, 230, 255))
    assert cyan > 100
    assert "32 sources" in res.stderr and "credit entropy" in res.stderr


def test_version_and_help_do_not_import_torch():
    code = ("import sys; from scr_export import cli; "
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "False False", res.stderr
    v = run(["--version"])
    assert v.returncode == 0 and re.match(r"scr-export \d+\.\d+\.\d+", v.stdout)


def test_inspect_json():
    res = run(["inspect", "tiny-internvl", "--json"])
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["family"] == "internvl" and info["decoder_layers"] == 4
    assert info["scr"] == {"k": 4, "lambda": 1.1, "layers": [0, 1], "diag_layers": [1, 2], "border": "exclude"}


def _checkpoint(tmp_path, cfg):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "ok.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(p)
    return str(p)


@pytest.mark.parametrize("case", ["missing_image", "unknown_preset", "not_a_vlm", "unsupported_vlm", "qwen_vl_v1",
                                  "unreadable_image", "no_config", "tiny_image", "bad_lambda", "bad_layers",
                                  "bad_scr_config", "no_cuda"])
def test_bad_input_names_problem_and_fix(case, tmp_path, png):
    model, image, extra = "tiny-llava", png, []
    expect = {
        "missing_image": "does not exist", "unknown_preset": "neither a preset nor an existing directory",
        "not_a_vlm": "is not a vision-language model", "unsupported_vlm": "which scr-export does not support",
        "qwen_vl_v1": "Qwen-VL (v1) checkpoint", "unreadable_image": "cannot be read",
        "no_config": "has no config.json", "tiny_image": "too small", "bad_lambda": "out of range",
        "bad_layers": "not a layer range", "bad_scr_config": "unknown SCR config keys",
        "no_cuda": "torch sees no CUDA device",
    }[case]
    if case == "missing_image":
        image = str(tmp_path / "nope.png")
    elif case == "unknown_preset":
        model = "tiny-llama-vision"
    elif case == "not_a_vlm":
        model = _checkpoint(tmp_path, {"model_type": "llama", "hidden_size": 64})
    elif case == "unsupported_vlm":
        model = _checkpoint(tmp_path, {"model_type": "paligemma", "vision_config": {}})
    elif case == "qwen_vl_v1":
        model = _checkpoint(tmp_path, {"model_type": "qwen", "visual": {"image_size": 448}})
    elif case == "unreadable_image":
        image = str(tmp_path / "bad.png")
        Path(image).write_bytes(b"\x89PNG not really")
    elif case == "no_config":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "tiny_image":
        image = str(tmp_path / "px.png")
        Image.new("RGB", (1, 1)).save(image)
    elif case == "bad_lambda":
        extra = ["--lambda", "0.5"]
    elif case == "bad_layers":
        extra = ["--layers", "first..last"]
    elif case == "bad_scr_config":
        cfg = tmp_path / "scr.json"
        cfg.write_text('{"lamda": 1.2}')
        extra = ["--scr-config", str(cfg)]
    elif case == "no_cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA; the missing-CUDA message cannot be provoked")
        extra = ["--device", "cuda"]
    res = run(["generate", model, "--image", image, "--prompt", "hi", "--max-new-tokens", "1", *extra])
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert expect in res.stderr and "fix:" in res.stderr
    assert "Traceback" not in res.stderr


def test_explain_leaves_nothing_on_bad_output_path(tmp_path, png):
    res = run(["explain", "tiny-llava", "--image", png, "--prompt", "hi", "--out", str(tmp_path / "no" / "x.png")])
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run(["explain", "tiny-llava", "--image", png, "--prompt", "hi", "--out", str(tmp_path / "x.jpg")])
    assert res.returncode == 2 and ".png" in res.stderr
    res = run(["explain", "tiny-llava", "--image", str(tmp_path / "missing.png"), "--prompt", "hi",
               "--out", str(tmp_path / "y.png")])
    assert res.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]


def test_ci_runs_the_readme_test_command():
    setup = README.split("## Set up")[1].split("```bash")
    test_cmd = setup[2].split("```")[0].strip()
    installs = [part.strip() for part in test_cmd.split("&&") if "pip install" in part]
    assert len(installs) == 2
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q", "")
    for cmd in installs:
        assert cmd in ci, f"README's {cmd!r} is not what .ci/run runs"


_BLOCKED_RUN = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
for m in [m for m in sys.modules if m.split(".")[0] == {blocked!r}]:
    del sys.modules[m]
from scr_export.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("blocked, argv, extra", [
    ("llama_cpp", ["convert", "tiny-llava", "--to", "gguf", "--out", "{out}"], "llamacpp"),
    ("gguf", ["convert", "tiny-llava", "--to", "gguf", "--quant", "q8_0", "--out", "{out}"], "llamacpp"),
])
def test_a_missing_extra_is_named_with_exit_2_and_no_output(blocked, argv, extra, tmp_path):
    """A command whose runtime package is missing says which extra installs it (exit 2, one line and a fix), never
    an ImportError traceback, and leaves no output directory."""
    out = tmp_path / "out"
    argv = [a.format(out=out) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _BLOCKED_RUN.format(blocked=blocked, argv=argv)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"needs {blocked}, which is not installed" in res.stderr and f"pip install 'scr-export[{extra}]'" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
