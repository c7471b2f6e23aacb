"""A llama.cpp model + context set up for parity: f32 KV cache, flash attention off, one micro-batch per prompt."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from scr_export.errors import SCRExportError

from .eval_callback import EvalCallback

_LOG_CALLBACK = None  # a module-level reference: a collected log callback segfaults the process


def _LOG_SINK():
    """The one log callback object (module-level: a collected callback segfaults on the next log line)."""
    _silence_llama_logs()
    return _LOG_CALLBACK


def _silence_llama_logs() -> None:
    global _LOG_CALLBACK
    import llama_cpp

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaContext:
    """One model, one context with an :class:`EvalCallback`; sequences up to ``n_ctx`` tokens, prefill in one ubatch."""

    def __init__(self, gguf_path: str | Path, n_ctx: int = 2048, threads: int | None = None, gpu_layers: int = 0,
                 with_callback: bool = True):
        try:
            import llama_cpp
        except ImportError:
            raise SCRExportError("llama-cpp-python is not installed",
                                 "pip install 'scr-export[llamacpp]' (builds llama.cpp; CMAKE_ARGS=-DGGML_NATIVE=OFF "
                                 "for a portable build)") from None
        self.lc = lc = llama_cpp
        _silence_llama_logs()
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise SCRExportError(f"llama.cpp cannot load {gguf_path}", "the GGUF file is damaged: convert again")
        self.callback = EvalCallback()
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_ctx  # all image rows must be in one micro-batch for SCR
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32: the default F16 cache costs ~7e-3 on logits
        cp.flash_attn_type = 0  # off: flash attention has no kq_soft_max node for the diagnostic pass
        if with_callback:  # without it: plain llama.cpp, for overhead measurements
            cp.cb_eval = self.callback.cfunc
            cp.cb_eval_user_data = None
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise SCRExportError("llama.cpp could not create a context", "lower n_ctx or free memory")
        self.n_ctx = n_ctx
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lc.llama_model_n_embd(self.model)
        self.n_past = 0

    def reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def truncate(self, n_past: int) -> None:
        """Forget every cached position >= n_past (llama.cpp requires consecutive positions per sequence)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"truncate({n_past}) outside 0..{self.n_past}")
        if not self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.ctx), 0, n_past, -1):
            raise SCRExportError("llama.cpp could not drop the cached positions", "call reset() and prefill again")
        self.n_past = n_past

    def _decode(self, batch) -> None:
        rc = self.lc.llama_decode(self.ctx, batch)
        self.callback.check()  # a hook error beats the return code: the outputs are not to be trusted
        if rc != 0:
            raise SCRExportError(f"llama_decode failed (rc={rc})", "the prompt may exceed the context size")

    def decode_embeddings(self, embeds: np.ndarray, want_logits: bool = True,
                          positions: np.ndarray | None = None) -> np.ndarray | None:
        """Decode [n, n_embd] float rows; returns [n, n_vocab] logits if asked.

        ``positions``: None for the next 1-D positions, or [sections, n] for M-RoPE models (t, h, w rows; llama.cpp
        takes 4 sections, section-major, the 4th zero).
        """
        n = embeds.shape[0]
        if self.n_past + n > self.n_ctx:
            raise SCRExportError(f"the prompt needs {self.n_past + n} positions but the context holds {self.n_ctx}",
                                 "raise n_ctx")
        lc = self.lc
        # M-RoPE takes 4 positions per row (section-major), so allocate the batch's arrays for 4n rows
        batch = lc.llama_batch_init(n if positions is None else 4 * n, self.n_embd, 1)
        try:
            x = np.ascontiguousarray(embeds, dtype=np.float32)
            ctypes.memmove(batch.embd, x.ctypes.data, x.nbytes)
            for i in range(n):
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                # at least the last row always outputs: Chameleon's graph writes its image-token mask into the
                # logits and asserts on an empty output
                batch.logits[i] = want_logits or i == n - 1
            batch.n_tokens = n
            if positions is not None:
                mpos = np.zeros((4, n), np.int32)
                mpos[: positions.shape[0]] = positions
                ctypes.memmove(batch.pos, np.ascontiguousarray(mpos.reshape(-1)).ctypes.data, 4 * n * 4)
            self._decode(batch)
        finally:
            lc.llama_batch_free(batch)
        self.n_past += n
        if not want_logits:
            return None
        ptr = lc.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()

    def decode_token(self, token: int, position: int | None = None) -> np.ndarray:
        """Decode one token id at ``position`` (default: the next one); returns its logits."""
        lc = self.lc
        batch = lc.llama_batch_init(1, 0, 1)
        try:
            batch.token[0] = int(token)
            batch.pos[0] = self.n_past if position is None else int(position)
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = True
            batch.n_tokens = 1
            self._decode(batch)
        finally:
            lc.llama_batch_free(batch)
        self.n_past += 1
        ptr = lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lc.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
