"""`manifest.json`: what a converted directory holds, so runtimes read it and never guess."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import SCRExportError

MANIFEST = "manifest.json"
FORMAT = 1
FLOAT = ("fp32", "fp16")
QUANTIZED = ("int8", "int4", "fp8")  # ONNX / TensorRT precisions that go through calibration.quantize


class ManifestError(SCRExportError):
    """A converted directory is missing, incomplete, or from an incompatible scr-export."""


def checkpoint_hash(path: Path) -> str:
    """sha256 over config.json and the weight files (names and bytes), in a stable order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a crash) never sees a half-written manifest."""
    import os

    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    if not d.is_dir():
        raise ManifestError(f"{d} is not a directory", "pass the directory written by `scr-export convert`")
    f = d / MANIFEST
    if not f.is_file():
        raise ManifestError(f"{d} has no {MANIFEST}, so it was not written by `scr-export convert`",
                            f"run `scr-export convert MODEL --to onnx --out {d}` first")
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{f} is not valid JSON ({exc})", "convert the model again") from None
    fmt = data.get("format")
    if not isinstance(fmt, int):
        raise ManifestError(f"{f} has no format number", "convert the model again")
    if fmt > FORMAT:
        raise ManifestError(f"{f} has format {fmt}, newer than this scr-export understands ({FORMAT})",
                            "upgrade scr-export (pip install -U scr-export), or convert again with this version")
    for key in ("family", "graphs", "scr", "source"):
        if key not in data:
            raise ManifestError(f"{f} lacks the {key!r} entry", "convert the model again")
    gguf = data.get("gguf")
    if gguf and not (d / gguf["file"]).is_file():
        raise ManifestError(f"{d} lacks {gguf['file']} (the GGUF model) named in its manifest",
                            "the directory is incomplete: convert the model again")
    for name, info in data["graphs"].items():
        for what, file in ((name, info["file"]), (f"{name}, GroupQueryAttention", info.get("gqa", {}).get("file")),
                           (f"{name}, MultiHeadAttention", info.get("mha", {}).get("file"))):
            if file is not None and not (d / file).is_file():
                raise ManifestError(f"{d} lacks {file} ({what}) named in its manifest",
                                    "the directory is incomplete: convert the model again")
    return data


def pick_runtime(manifest: dict, runtime: str = "auto") -> str:
    """'llamacpp', 'tensorrt' or 'onnx' for a directory's manifest and the user's --runtime."""
    if "gguf" in manifest:
        if runtime not in ("auto", "llamacpp"):
            raise SCRExportError(f"--runtime {runtime} cannot run a GGUF directory", "use --runtime auto")
        return "llamacpp"
    if runtime == "auto":
        return "tensorrt" if "tensorrt" in manifest else "onnx"
    if runtime == "tensorrt" and "tensorrt" not in manifest:
        raise SCRExportError("this directory was converted for ONNX Runtime, not TensorRT",
                             "convert with --to trt, or use --runtime onnx")
    if runtime == "llamacpp":
        raise SCRExportError("this directory holds ONNX graphs, not a GGUF model", "use --runtime onnx or tensorrt")
    return runtime
