"""How SCRNeighbourInject's CUDA kernel is launched: entry point, block and grid. The C launcher
(``scr_neighbour_inject_launch`` in scr_neighbour_inject.cu) and the TensorRT plugin's ahead-of-time launch both
follow these rules; ``launch_on_torch`` calls the C launcher on torch CUDA tensors (tests and benchmarks).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
ENTRY_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_THREADS = 256  # the entry points' __launch_bounds__


def vector_width(dtype: str) -> int:
    """Elements per 16-byte load."""
    return 16 // ELEMENT_BYTES[dtype]


def vectorised(dtype: str, dim: int) -> bool:
    """Whether a row of ``dim`` elements can be read in 16-byte vectors (allocators align buffers to >= 256 B)."""
    return dim % vector_width(dtype) == 0


def entry_name(dtype: str, dim: int) -> str:
    if dtype not in ENTRY_SUFFIX:
        raise ValueError(f"SCRNeighbourInject has no kernel for {dtype} (float32, float16, bfloat16)")
    name = f"scr_neighbour_inject_{ENTRY_SUFFIX[dtype]}"
    return f"{name}_v{vector_width(dtype)}" if vectorised(dtype, dim) else name


def block_threads(dim: int, vec: int) -> int:
    """Threads per block: one warp per 32 vectors of the row, at most MAX_THREADS (mirrors scr_block_threads)."""
    n = -(-dim // vec)
    return max(32, min(MAX_THREADS, -(-n // 32) * 32))


def launch_config(dtype: str, batch: int, seq: int, dim: int) -> dict:
    """Entry point, grid and block for hidden states [batch, seq, dim]: one block per (b, t) row."""
    vec = vector_width(dtype) if vectorised(dtype, dim) else 1
    return {"entry": entry_name(dtype, dim), "grid": (batch * seq, 1, 1), "block": (block_threads(dim, vec), 1, 1),
            "vector": vec}


@lru_cache(maxsize=1)
def _cuda_library():
    from .build import build_cuda_library

    lib = ctypes.CDLL(str(build_cuda_library()))
    fn = lib.scr_neighbour_inject_launch
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.scr_block_threads.restype = ctypes.c_int
    lib.scr_block_threads.argtypes = [ctypes.c_int64, ctypes.c_int]
    return lib


def launch_on_torch(hidden, donor, scale, weight, out=None):
    """Run the CUDA kernel on torch CUDA tensors (hidden [B,T,D] float32/float16/bfloat16) on the current stream."""
    import torch

    dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[hidden.dtype]
    hidden = hidden.contiguous()
    donor, scale, weight = donor.to(torch.int64).contiguous(), scale.float().contiguous(), weight.float().contiguous()
    out = torch.empty_like(hidden) if out is None else out
    b, t, d = hidden.shape
    rc = _cuda_library().scr_neighbour_inject_launch(
        DTYPE_CODES[dtype], hidden.data_ptr(), donor.data_ptr(), scale.data_ptr(), weight.data_ptr(), out.data_ptr(),
        b, t, d, torch.cuda.current_stream().cuda_stream)
    if rc != 0:
        raise RuntimeError(f"scr_neighbour_inject_launch failed: cudaError {rc}")
    return out
