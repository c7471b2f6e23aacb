"""Load and save graphs the way every pass expects: streamed external data, IR version 10."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

IR_VERSION = 10  # onnx 1.23 defaults to a newer IR that current ONNX Runtime GPU builds reject


def load_model(path: str | os.PathLike) -> ir.Model:
    return ir.load(str(path))


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool = True) -> None:
    """Save with IR version 10; weights go to ``<name>.data`` beside the file (needed past 2 GB)."""
    path = Path(path)
    model.ir_version = IR_VERSION
    if external_data:
        ir.save(model, str(path), external_data=path.name + ".data")
    else:
        ir.save(model, str(path))
