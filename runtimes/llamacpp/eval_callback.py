"""ggml's scheduler eval callback as a safe Python hook: read and edit named graph tensors during llama_decode.

Guards (llama_probe.md): a callback that raises or returns False makes llama_decode return 0 with silently wrong
logits, so every exception is caught, recorded, and re-raised by ``check()`` after the decode; the ctypes function
object is kept alive as long as this object; tensors are read and written through ggml's backend get/set, which
works for host and device (CUDA) buffers alike.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np

Handler = Callable[[str, np.ndarray], "np.ndarray | None"]


class DecodeCallbackError(RuntimeError):
    """A hook failed during llama_decode; that decode's outputs must not be used."""


def _libggml_base():
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            lib = ctypes.CDLL(str(libdir / name))
            break
    else:
        raise RuntimeError(f"libggml-base not found in {libdir}")
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nrows.restype = ctypes.c_int64
    lib.ggml_nrows.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_element_size.restype = ctypes.c_size_t
    lib.ggml_element_size.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_set.restype = None
    lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


class EvalCallback:
    """Route named tensors (``l_out-3``, ``kq_soft_max-9``) to Python handlers while ``active``.

    A handler gets the tensor as float32 [rows, ne0] (ggml order: ne0 is the fastest axis) and returns a new array
    of the same shape to write back, or None to only observe.
    """

    def __init__(self):
        import llama_cpp

        self._ggml = _libggml_base()
        self.handlers: dict[str, Handler] = {}
        self.active = False
        self.errors: list[BaseException] = []
        self.seen: list[str] = []
        # after this tensor's handler, decline it: the scheduler then stops computing the graph (ggml-backend's
        # compute_splits breaks out when the callback returns False for data it asked for); the pass's outputs and
        # the KV cells of later layers are garbage and must be discarded, as the diagnostic pass does
        self.stop_after: str | None = None
        self.cfunc = llama_cpp.ggml_backend_sched_eval_callback(self._callback)  # keep alive with this object

    def _callback(self, tensor, ask, user_data):
        try:
            if not self.active:
                return False if ask else True
            name = self._ggml.ggml_get_name(tensor).decode()
            if ask:
                return name in self.handlers
            g = self._ggml
            if g.ggml_element_size(tensor) != 4 or not g.ggml_is_contiguous(tensor):
                raise DecodeCallbackError(f"tensor {name} is not contiguous float32; SCR needs an f32 graph tensor")
            n, rows = g.ggml_nelements(tensor), g.ggml_nrows(tensor)
            buf = np.empty(n, np.float32)
            g.ggml_backend_tensor_get(tensor, buf.ctypes.data, 0, buf.nbytes)
            self.seen.append(name)
            result = self.handlers[name](name, buf.reshape(rows, n // rows))
            if result is not None:
                out = np.ascontiguousarray(result, dtype=np.float32).reshape(-1)
                if out.size != n:
                    raise DecodeCallbackError(f"handler for {name} returned {out.size} values for a tensor of {n}")
                g.ggml_backend_tensor_set(tensor, out.ctypes.data, 0, out.nbytes)
            return name != self.stop_after
        except BaseException as exc:  # never let ggml see a failure: it would truncate the graph silently
            self.errors.append(exc)
            return True

    def check(self) -> None:
        """Raise the first error a handler hit during the last decode (and forget them)."""
        if self.errors:
            first, self.errors = self.errors[0], []
            raise DecodeCallbackError(f"an SCR hook failed during llama_decode: {first!r}; its outputs were "
                                      "discarded") from first
