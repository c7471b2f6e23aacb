"""llama.cpp's own image path for Qwen2-VL: an mmproj GGUF (made by llama.cpp's converter) run through libmtmd.

The converter is not installed with llama-cpp-python; it ships in its source distribution. ``converter_dir()`` finds
it (``$SCR_EXPORT_LLAMA_CPP_SRC``, or the cache) or fetches that sdist from the package index once with pip.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from scr_export.errors import SCRExportError

LLAMA_CPP_PYTHON = "0.3.36"
MMPROJ_FAMILIES = {"qwen2_vl"}  # families whose projector llama.cpp's converter and libmtmd support (verified)
_NEEDED = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def converter_dir(progress=print) -> Path:
    """A directory holding llama.cpp's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``."""
    env = os.environ.get("SCR_EXPORT_LLAMA_CPP_SRC")
    if env:
        d = Path(env)
        if not (d / "convert_hf_to_gguf.py").is_file():
            raise SCRExportError(f"SCR_EXPORT_LLAMA_CPP_SRC={env} has no convert_hf_to_gguf.py",
                                 "point it at a llama.cpp source tree (vendor/llama.cpp of llama-cpp-python)")
        return d
    from scr_export.presets import cache_root

    d = cache_root() / f"llama.cpp-converter-{LLAMA_CPP_PYTHON}"
    if (d / "convert_hf_to_gguf.py").is_file():
        return d
    progress(f"      fetching llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON} source) with pip, once")
    d.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if res.returncode != 0 or not sdists:
            raise SCRExportError("cannot fetch llama.cpp's converter (pip download llama-cpp-python failed: "
                                 f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no file'})",
                                 "set SCR_EXPORT_LLAMA_CPP_SRC to a llama.cpp source tree, or convert with "
                                 "--images onnx (images then go through the ONNX vision encoder)")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        staging = Path(tmp) / "src"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0] in _NEEDED]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        os.replace(staging, d)
    return d


def write_mmproj(checkpoint: Path, out: Path, progress=print) -> None:
    """Run llama.cpp's converter in --mmproj mode on a transformers checkpoint directory (f32)."""
    src = converter_dir(progress)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(checkpoint), "--mmproj", "--outtype", "f32",
           "--outfile", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 or not out.is_file():
        tail = "\n".join(res.stderr.strip().splitlines()[-3:])
        raise SCRExportError(f"llama.cpp's converter could not write the mmproj:\n{tail}",
                             "convert with --images onnx (images then go through the ONNX vision encoder)")


class MtmdImages:
    """Image embeddings from libmtmd (llama.cpp's multimodal library) for a loaded llama.cpp model."""

    def __init__(self, mmproj: Path, llama_model: Any, threads: int = 2):
        from llama_cpp import mtmd_cpp as mt

        from .context import _LOG_SINK, _silence_llama_logs

        _silence_llama_logs()
        mt.mtmd_log_set(_LOG_SINK(), ctypes.c_void_p(0))
        mt.mtmd_helper_log_set(_LOG_SINK(), ctypes.c_void_p(0))
        self.mt = mt
        params = mt.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = threads
        params.warmup = False
        self.ctx = mt.mtmd_init_from_file(str(mmproj).encode(), llama_model, params)
        if not self.ctx:
            raise SCRExportError(f"libmtmd cannot load {mmproj}", "the mmproj file is damaged: convert again")

    def embed(self, image: Any, n_embd: int) -> tuple[np.ndarray, int, int]:
        """(features [rows*cols, n_embd], rows, cols) for one PIL image, in mtmd's row-major token order."""
        mt = self.mt
        rgb = np.array(image.convert("RGB"), dtype=np.uint8, order="C")  # a writable copy for ctypes
        buf = (ctypes.c_uint8 * rgb.size).from_buffer(rgb)
        bitmap = mt.mtmd_bitmap_init(image.size[0], image.size[1], buf)
        chunks = mt.mtmd_input_chunks_init()
        try:
            text = mt.mtmd_input_text()
            marker = mt.mtmd_default_marker()
            text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mt.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise SCRExportError("libmtmd could not tokenize the image", "pass an RGB image")
            for i in range(mt.mtmd_input_chunks_size(chunks)):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                if mt.mtmd_input_chunk_get_type(chunk) != 1:  # MTMD_INPUT_CHUNK_TYPE_IMAGE
                    continue
                tokens = mt.mtmd_input_chunk_get_tokens_image(chunk)
                n = mt.mtmd_image_tokens_get_n_tokens(tokens)
                cols, rows = mt.mtmd_image_tokens_get_nx(tokens), mt.mtmd_image_tokens_get_ny(tokens)
                if mt.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise SCRExportError("libmtmd failed to encode the image", "check the mmproj file")
                ptr = mt.mtmd_get_output_embd(self.ctx)
                return np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).reshape(n, n_embd).copy(), rows, cols
            raise SCRExportError("libmtmd produced no image chunk", "check the mmproj file")
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.mt.mtmd_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
