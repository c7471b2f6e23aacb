"""GPU memory, copies and streams for the TensorRT runner through cuda-python's runtime bindings (no torch on the run
path). Not exercised in CI (no GPU there): the calls are the CUDA runtime API's, one for one."""

from __future__ import annotations

from typing import Any

import numpy as np

from scr_export.errors import SCRExportError


class CudaUnavailable(SCRExportError):
    """cuda-python, or a GPU for it, is not available here."""


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6 on; ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            raise CudaUnavailable("cuda-python is not installed (the TensorRT runner's GPU memory and streams)",
                                      "pip install 'scr-export[tensorrt]' (cuda-python), or use JetPack's") from None
    return cudart


def check(result: tuple) -> Any:
    """A cuda-python call's (error, values...) -> the values; a CUDA error is raised with its name."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise SCRExportError(f"CUDA error {int(err)} ({getattr(err, 'name', err)})",
                             "check the GPU (nvidia-smi / tegrastats) and that the engines were built on it")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def device_capability(device: int = 0) -> tuple[int, int]:
    cudart = import_cudart()
    count = check(cudart.cudaGetDeviceCount())
    if count < 1:
        raise CudaUnavailable("no CUDA GPU is visible", "build and run the engines on the target device")
    major = check(cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device))
    minor = check(cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device))
    return int(major), int(minor)


class DeviceMemory:
    """One stream and a device buffer per tensor name, grown when a call needs more (never per call)."""

    def __init__(self):
        self.cudart = import_cudart()
        self.stream = check(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    def buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < max(nbytes, 1):  # TensorRT wants a valid address even for an empty tensor
            if ptr:
                check(self.cudart.cudaFree(ptr))
            ptr, size = int(check(self.cudart.cudaMalloc(max(nbytes, 1)))), max(nbytes, 1)
            self.buffers[name] = (ptr, size)
        return ptr

    def upload(self, name: str, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.buffer(name, array.nbytes)
        if array.nbytes:
            check(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                              self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        return ptr

    def download(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.empty(shape, dtype)
        if out.nbytes:
            check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name][0], out.nbytes,
                                              self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        return out

    def synchronize(self) -> None:
        check(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may be gone already
            pass
