"""The lean runtime: converted directories run without torch or transformers (issue 11).

- per family, ONNX and GGUF: the runner in a process where importing torch or transformers raises gives exactly the
  tokens of the full installation's path (transformers' processors and tokenizer), with SCR on and off;
- a fresh virtual environment with ``pip install -e .`` (no extra) runs ``scr-export run`` on a converted
  directory, and the commands that need the export extra say so (exit 2).
"""

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
from runtimes.registry import open_runtime  # noqa: E402
from scr_export.processing import encode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the red object?"
STEPS = 8

# Run in the child: torch and transformers cannot be imported; the directory is opened and run as `scr-export run`
# does, and the child proves at the end that neither module was loaded.
_CHILD = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Block())
from PIL import Image
from runtimes.registry import open_runtime
runner = open_runtime({directory!r})
inputs = runner.encode([[Image.open({image!r}).convert("RGB")]], [{prompt!r}])
out = {{"input_ids": inputs.array("input_ids").tolist()}}
for scr in (True, False):
    res = runner.generate(inputs, scr=scr, max_new_tokens={steps}, stop_at_eos=False)
    out["scr" if scr else "off"] = res.tokens.tolist()
    out["sources" if scr else "_"] = [p.sources.tolist() for p in res.plan.images] if scr else None
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
print(json.dumps({{**out, "loaded": loaded}}))
"""


def _torch_free(directory: Path, image: Path) -> dict:
    child = _CHILD.format(directory=str(directory), image=str(image), prompt=PROMPT, steps=STEPS)
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lean") / "image.png"
    make_image(200, 120, seed=5).save(path)
    return path


@pytest.mark.parametrize("kind", ["onnx", "gguf"])
@pytest.mark.parametrize("family", sorted(TINY_PRESETS))
def test_the_torch_free_runner_gives_the_tokens_of_the_full_installation(family, kind, image_file, converted,
                                                                         gguf_dir):
    if kind == "gguf":
        import llama_cpp  # noqa: E402,F401  (installed by the README's test command: a failed import fails)
        directory = gguf_dir(family, "q8_0")[0]
    else:
        directory = converted(family)[0]
    got = _torch_free(directory, image_file)
    assert got["loaded"] == []
    # the full installation: transformers' processors and tokenizer build the inputs, the same runner runs them
    from PIL import Image

    fam = load(TINY_PRESETS[family])
    want_inputs = encode(fam, [[Image.open(image_file).convert("RGB")]], [PROMPT])
    assert got["input_ids"] == want_inputs.array("input_ids").tolist()
    runner = open_runtime(directory)
    for scr, key in ((True, "scr"), (False, "off")):
        want = runner.generate(want_inputs, scr=scr, max_new_tokens=STEPS, stop_at_eos=False)
        assert got[key] == want.tokens.tolist(), f"SCR {'on' if scr else 'off'}"
        if scr:
            assert got["sources"] == [p.sources.tolist() for p in want.plan.images]
            assert not want.plan.is_identity


def _lean_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with `pip install -e .` and nothing else (PyPI: numpy, pillow, tokenizers,
    onnxruntime)."""
    venv = tmp_path_factory.mktemp("lean-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-e", str(ROOT)], capture_output=True,
                         text=True, timeout=1200)
    if pip.returncode != 0 and "Could not find a version" in pip.stderr + pip.stdout:
        pytest.skip("the package index is not reachable from here: " + pip.stderr.strip().splitlines()[-1])
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


@pytest.mark.slow
def test_a_fresh_venv_without_extras_runs_a_converted_directory(tmp_path_factory, converted, image_file):
    """`pip install -e .` alone: no torch, no transformers, no onnx; `scr-export run` gives the full install's text;
    the commands that need the export extra name it (exit 2, no traceback)."""
    venv = _lean_venv(tmp_path_factory)
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, check=True).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert {"onnxruntime", "tokenizers", "numpy", "pillow"} <= installed
    assert not {"torch", "transformers", "onnx", "onnxscript"} & installed, installed
    directory = converted("llava")[0]
    cli = str(venv / "bin" / "scr-export")
    argv = ["run", str(directory), "--image", str(image_file), "--prompt", PROMPT, "--max-new-tokens", "6"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([cli, *argv], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path_factory.getbasetemp())
    assert res.returncode == 0, res.stderr[-3000:]
    full = subprocess.run([sys.executable, "-m", "scr_export.cli", *argv], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert full.returncode == 0, full.stderr[-3000:]
    assert res.stdout == full.stdout
    for needs_torch in (["convert", "tiny-llava", "--to", "onnx", "--out", str(tmp_path_factory.getbasetemp() / "x")],
                        ["validate", str(directory)]):
        res = subprocess.run([cli, *needs_torch], capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "pip install 'scr-export[export]'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path_factory.getbasetemp() / "x").exists()


def test_the_host_vision_ids_equal_transformers():
    """Qwen2-VL's vision rotary ids and cu_seqlens in numpy (the runners') equal transformers' functions."""
    import torch
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    from scr_export.positions import vision_cu_seqlens, vision_positions

    for thw in [(1, 4, 6), (1, 8, 8), (2, 6, 4), (1, 2, 2), (1, 16, 10)]:
        grid = torch.tensor([thw])
        np.testing.assert_array_equal(vision_positions(thw, 2), get_vision_position_ids(grid, 2).numpy())
        np.testing.assert_array_equal(vision_cu_seqlens(thw), get_vision_cu_seqlens(grid).numpy())
