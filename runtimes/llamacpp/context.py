"""llama.cpp contexts set up for parity: f32 KV cache, flash attention off, one micro-batch per prompt; a hooked
context hands its prompt's KV cache to a plain one (no eval callback) for decoding."""

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
    """One model and one context; sequences up to ``n_ctx`` tokens, a prefill in one micro-batch of up to
    ``n_ubatch`` rows (default ``n_ctx``: all image rows must meet in one micro-batch for SCR).

    ``callback``: the :class:`EvalCallback` whose hooks run during decodes (None: a plain context, as stock llama.cpp
    runs; there is no way to remove an eval callback from a live context). ``share_model_of``: another context
    whose loaded model this one uses (weights once, a KV cache each); the first context owns and frees the model.
    """

    def __init__(self, gguf_path: str | Path | None = None, n_ctx: int = 2048, threads: int | None = None,
                 gpu_layers: int = 0, with_callback: bool = True, *, callback: EvalCallback | None = None,
                 share_model_of: LlamaContext | None = None, n_ubatch: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise SCRExportError("llama-cpp-python is not installed",
                                 "pip install 'scr-export[llamacpp]' (builds llama.cpp; CMAKE_ARGS=-DGGML_NATIVE=OFF "
                                 "for a portable build)") from None
        self.lc = lc = llama_cpp
        _silence_llama_logs()
        lc.llama_backend_init()
        self.owns_model = share_model_of is None
        self._owner = share_model_of  # keeps the model's owner alive (and its model loaded) while this context lives
        if share_model_of is not None:
            self.model = share_model_of.model
        else:
            mp = lc.llama_model_default_params()
            mp.n_gpu_layers = gpu_layers
            self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
            if not self.model:
                raise SCRExportError(f"llama.cpp cannot load {gguf_path}", "the GGUF file is damaged: convert again")
        self.callback = (callback or EvalCallback()) if with_callback else None
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(n_ubatch or n_ctx, n_ctx)
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32: the default F16 cache costs ~7e-3 on logits
        cp.flash_attn_type = 0  # off: flash attention has no kq_soft_max node for the diagnostic pass
        if self.callback is not None:
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

    def copy_state_to(self, other: LlamaContext) -> int:
        """Move sequence 0's KV cells (positions, M-RoPE included) into ``other``, which continues from here
        exactly as this context would (same model, same f32 cache types); returns the bytes copied."""
        lc = self.lc
        size = lc.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        got = lc.llama_state_seq_get_data(self.ctx, buf, size, 0)
        other.reset()
        if got != size or lc.llama_state_seq_set_data(other.ctx, buf, size, 0) != size:
            raise SCRExportError("llama.cpp could not move the prompt's KV cache between contexts",
                                 "both contexts must load the same model with the same cache types")
        other.n_past = self.n_past
        return size

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
        if self.callback is not None:
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
            if self.owns_model:
                self.lc.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
