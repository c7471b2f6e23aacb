"""Attach the SCRNeighbourInject custom-op library to an ONNX Runtime session, or leave the node's ONNX function
body to run. ``SCR_EXPORT_ORT_OPS`` (or the runner's ``scr_kernel`` argument) chooses:

  auto      the library when it has been built for the current sources (``scr-export build-ops``), else the function
  library   the library, or a clear error when it has not been built
  function  the function body (standard ONNX ops) even when a library exists
  <path>    that library file
"""

from __future__ import annotations

import os
from pathlib import Path

from scr_export.errors import SCRExportError

from .build import find_library

FUNCTION = "ONNX function body (standard ops)"


def choose_library(providers: list[str], mode: str | None = None) -> Path | None:
    """The library file to register for a session on ``providers``, or None for the function body."""
    mode = mode or os.environ.get("SCR_EXPORT_ORT_OPS") or "auto"
    if mode == "function":
        return None
    if mode not in ("auto", "library"):
        path = Path(mode)
        if not path.is_file():
            raise SCRExportError(f"the SCR custom-op library {path} does not exist",
                                 "build it with `scr-export build-ops` or set SCR_EXPORT_ORT_OPS=auto")
        return path
    # the CUDA build registers the CPU kernels too; prefer it whenever the session may run on CUDA
    kinds = ["cuda", "cpu"] if "CUDAExecutionProvider" in providers else ["cpu", "cuda"]
    for kind in kinds:
        lib = find_library(kind)
        if lib is not None:
            return lib
    if mode == "library":
        raise SCRExportError("no SCR custom-op library has been built for these sources",
                             "run `scr-export build-ops` (add --cuda for onnxruntime-gpu), or use the function body")
    return None


def attach(session_options, providers: list[str], mode: str | None = None) -> str:
    """Register the chosen library on ``session_options``; returns what will run the SCR nodes, in words."""
    lib = choose_library(providers, mode)
    if lib is None:
        return FUNCTION
    try:
        session_options.register_custom_ops_library(str(lib))
    except Exception as exc:  # ORT reports load failures with its own exception types
        raise SCRExportError(f"ONNX Runtime cannot load the SCR custom-op library {lib}: {str(exc).splitlines()[0]}",
                             "rebuild it with `scr-export build-ops --force`, or set SCR_EXPORT_ORT_OPS=function") from None
    return f"custom-op library {lib.name}"
