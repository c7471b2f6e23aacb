"""A checkpoint's safetensors as an index of tensors read one at a time (memory-mapped), checked before any work.

The streaming converters never hold the model's weights: they read each tensor from here when they write it. This
module needs no torch to open and check a checkpoint (headers only, through ``safetensors``' numpy reader);
``read`` returns a torch tensor (bf16 has no numpy type) and imports torch then.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, SCRExportError

INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
# safetensors dtype names -> (numpy-style name, bytes per element)
_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
           "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
           "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
_ITEMSIZE = dict(_DTYPES.values())


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: str                 # "float16", "bfloat16", "float32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]


class Checkpoint:
    """The tensors of a ``save_pretrained`` directory: one file or shards with ``model.safetensors.index.json``."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo]):
        self.path = path
        self.tensors = tensors

    # -- opening ------------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Read every shard's header; refuse a missing shard, an index that names an absent file, a file that is
        not safetensors, with the name and the fix."""
        path = Path(path)
        files = cls._files(path)
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for info in _headers(f):
                tensors[info.key] = info
        index = path / INDEX
        if index.is_file():
            weight_map = _read_index(index)
            absent = sorted(k for k in weight_map if k not in tensors)
            if absent:
                raise ModelLoadError(f"{index} lists {len(absent)} tensors that its shards do not hold "
                                     f"(first: {absent[0]!r} in {weight_map[absent[0]]})",
                                     "copy the checkpoint again (a shard is truncated or from another model)")
        return cls(path, tensors)

    @staticmethod
    def _files(path: Path) -> list[Path]:
        index = path / INDEX
        if index.is_file():
            names = sorted(set(_read_index(index).values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise ModelLoadError(f"{index.name} points at {missing[0]}, which is not in {path}"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                                     "copy the missing shard(s) into the checkpoint directory")
            return [path / n for n in names]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in path.glob("*.bin"))
            raise ModelLoadError(f"{path} holds no safetensors weights" + (f" (it has {bins[0]})" if bins else ""),
                                 "save the model with save_pretrained(dir, safe_serialization=True): the streaming "
                                 "converters read safetensors only")
        # shards without an index: every "-0000i-of-0000n" must be there
        for f in files:
            m = _SHARD.match(f.name)
            if m:
                n = int(m["n"])
                for i in range(1, n + 1):
                    want = f"{m['stem']}-{i:05d}-of-{n:05d}.safetensors"
                    if not (path / want).is_file():
                        raise ModelLoadError(f"the checkpoint's shard {want} is missing from {path}",
                                             "copy the missing shard into the checkpoint directory")
        return files

    # -- what is inside ---------------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __getitem__(self, key: str) -> TensorInfo:
        return self.tensors[key]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def float_dtype(self) -> str:
        """The dtype holding most of the checkpoint's float bytes (what an fp16 / bf16 checkpoint is saved in)."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in ("float16", "bfloat16", "float32", "float64"):
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=by.get) if by else "float32"

    def read(self, key: str, dtype: Any = None):
        """One tensor as a torch tensor (memory-mapped read; a copy of this tensor only), cast to ``dtype``."""
        from safetensors import safe_open

        info = self.tensors[key]
        with safe_open(str(info.file), framework="pt") as f:
            t = f.get_tensor(key)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def check_shapes(self, expected: dict[str, tuple[int, ...]], what: str) -> None:
        """Every ``expected`` key is present with that shape, else an error naming the tensor, both shapes, the file."""
        for key, shape in expected.items():
            info = self.tensors.get(key)
            if info is None:
                raise ModelLoadError(f"the checkpoint has no tensor {key!r}, which {what} needs",
                                     "check that the directory holds the whole model (all shards) for its config.json")
            if tuple(info.shape) != tuple(shape):
                raise ModelLoadError(f"the tensor {key!r} in {info.file.name} has shape {list(info.shape)}, but "
                                     f"config.json gives {what} {list(shape)}",
                                     "the weights and config.json are from different models: use the config that "
                                     "came with the weights")


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index} is not a safetensors index ({exc})",
                             "restore the checkpoint's index file, or save the model again") from None


def _headers(f: Path) -> list[TensorInfo]:
    """Key, dtype and shape of every tensor in ``f`` (safetensors reads the header and checks the file's length)."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="numpy") as st:
            out = []
            for key in st.keys():
                sl = st.get_slice(key)
                out.append(TensorInfo(key, f, _DTYPES[sl.get_dtype()][0], tuple(int(d) for d in sl.get_shape())))
        return out
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for unreadable files
        raise ModelLoadError(f"{f} is not a readable safetensors file ({exc})",
                             "copy the checkpoint file again (it may be truncated)") from None


def check_free_space(directory: Path, need: int, what: str) -> None:
    """Refuse before writing when ``directory``'s file system has less than ``need`` bytes (+5 %) free."""
    free = shutil.disk_usage(directory).free
    if free < need * 1.05:
        raise SCRExportError(f"{what} needs about {need / 2**30:.2f} GiB in {directory}, which has "
                             f"{free / 2**30:.2f} GiB free",
                             "free some space or choose an --out on a larger disk")
