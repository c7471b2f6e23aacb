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


def load_structure(path: str | os.PathLike) -> ir.Model:
    """The graph of ``path`` with its external initializers left where they are (nothing of the weights is read):
    a pass that only rewires nodes can then write a graph that keeps referring to the same weights file."""
    import onnx

    return ir.from_proto(onnx.load(str(path), load_external_data=False))


def save_structure(model: ir.Model, path: str | os.PathLike) -> None:
    """Save a graph from ``load_structure`` into the same directory: its initializers keep naming the weights file
    they came from (several graphs can share one file); IR version 10."""
    import onnx

    model.ir_version = IR_VERSION
    onnx.save(ir.to_proto(model), str(path))
