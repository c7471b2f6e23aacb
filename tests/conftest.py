from __future__ import annotations

import importlib
import os
import tempfile

import numpy as np
import pytest

# The test configuration's own cache (presets, calibration ranges): never the user's ~/.cache/scr-export, never a
# stale range from an earlier version; subprocesses inherit it. SCR_EXPORT_TEST_CACHE keeps one across runs.
_OWN_CACHE = None if os.environ.get("SCR_EXPORT_TEST_CACHE") else tempfile.mkdtemp(prefix="scr-export-test-cache-")
os.environ["SCR_EXPORT_CACHE"] = os.environ.get("SCR_EXPORT_TEST_CACHE") or _OWN_CACHE

# What the README's test command installs: a package here that cannot be imported is a broken installation, which
# fails the run; it is never a reason to skip (TensorRT, which CI machines cannot install, is not in the list).
INSTALLED_BY_TEST_COMMAND = ("torch", "transformers", "safetensors", "onnx", "onnx_ir", "onnxscript", "onnxruntime",
                             "ml_dtypes", "sentencepiece", "matplotlib", "llama_cpp", "gguf", "fastapi", "uvicorn",
                             "prometheus_client", "httpx", "openai", "ray", "hypothesis")


def pytest_sessionstart(session):
    broken = []
    for name in INSTALLED_BY_TEST_COMMAND:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a shared library that fails to load
            broken.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if broken:
        pytest.exit("the README's test command installs these, but they cannot be imported: " + "; ".join(broken)
                    + ". Fix the installation (see the README's test command); nothing is skipped for it.", 1)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

TINY_PRESETS = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl", "internvl": "tiny-internvl",
                "chameleon": "tiny-chameleon"}

_LOADED: dict[str, object] = {}


def load(name: str):
    from scr_export.loading import load_vlm

    if name not in _LOADED:
        _LOADED[name] = load_vlm(name)
    return _LOADED[name]


def make_image(width: int = 240, height: int = 100, seed: int = 0):
    """A structured test image: gradients, a bright block, noise (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x / width * 255, y / height * 255, (np.sin(x / 9) * 0.5 + 0.5) * 255], -1)
    img[height // 4: height // 2, width // 3: width // 2] = [250, 30, 30]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def image():
    return make_image()


@pytest.fixture(params=sorted(TINY_PRESETS), scope="session")
def family_name(request):
    return request.param


@pytest.fixture(scope="session")
def vlm(family_name):
    return load(TINY_PRESETS[family_name])


_CONVERTED: dict = {}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """``converted(family)``: the tiny preset converted to an ONNX directory, once per session (path, report)."""
    def get(family: str):
        from scr_export.convert import convert_to_onnx

        if family not in _CONVERTED:
            out = tmp_path_factory.mktemp("onnx") / family
            _CONVERTED[family] = convert_to_onnx(TINY_PRESETS[family], out, progress=lambda m: None)
        return _CONVERTED[family]

    return get


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory):
    """``gguf_dir(family, quant)``: the tiny preset converted to a GGUF directory, once per session."""
    def get(family: str, quant: str):
        from runtimes.llamacpp.convert import convert_to_gguf

        key = (family, quant)
        if key not in _CONVERTED:
            out = tmp_path_factory.mktemp("gguf") / f"{family}-{quant}"
            _CONVERTED[key] = convert_to_gguf(TINY_PRESETS[family], out, quant=quant, progress=lambda m: None)
        return _CONVERTED[key]

    return get
