"""SCR's two passes as eval-callback handlers: read ``kq_soft_max-L`` (diagnostic), edit ``l_out-L`` (redistribution)."""

from __future__ import annotations

import numpy as np

from scr_export.config import SCRConfig
from scr_export.errors import SCRExportError

from .eval_callback import EvalCallback


class MicroBatchError(SCRExportError):
    """The image rows were split across micro-batches: neighbours would be computed before their source arrives."""


def install_redistribution(callback: EvalCallback, config: SCRConfig, donor: np.ndarray, scale: np.ndarray,
                           weight: np.ndarray) -> None:
    """h'[t] = scale[t]·h[t] + weight[t]·h[donor[t]] on ``l_out-L`` for every L in ``config.layers``.

    ``donor/scale/weight`` cover the T positions of the prefill, which must arrive as one micro-batch of T rows.
    """
    active = np.flatnonzero((scale != 1) | (weight != 0))
    t_expected = donor.shape[0]
    s = scale[active].astype(np.float32)[:, None]
    w = weight[active].astype(np.float32)[:, None]
    d = donor[active]

    def handler(name: str, rows: np.ndarray):
        if rows.shape[0] != t_expected:
            raise MicroBatchError(f"{name} holds {rows.shape[0]} rows but the plan covers {t_expected} positions",
                                  "decode the whole prompt in one micro-batch (n_batch = n_ubatch >= prompt length)")
        if active.size == 0:
            return None
        out = rows.copy()
        out[active] = s * rows[active] + w * rows[d]  # both reads see the pre-edit rows
        return out

    for layer in config.layer_indices():
        callback.handlers[f"l_out-{layer}"] = handler


class AttentionCollector:
    """Each diagnostic layer's ``kq_soft_max-L`` averaged over heads: [L, T, T] (queries × keys) for one prefill,
    reduced on the host by ``scr_export.attention_map`` like every runtime's."""

    def __init__(self, callback: EvalCallback, config: SCRConfig, n_tokens: int, n_head: int):
        self.n_tokens, self.n_head = n_tokens, n_head
        self.layers = list(config.diag_layer_indices())
        self.rows: dict[int, np.ndarray] = {}
        for layer in self.layers:
            callback.handlers[f"kq_soft_max-{layer}"] = self._handler

    def _handler(self, name: str, rows: np.ndarray):
        # ggml layout [n_head][n_tokens][n_kv (padded)]: rows = n_head * n_tokens
        if rows.shape[0] != self.n_head * self.n_tokens:
            raise MicroBatchError(f"{name} holds {rows.shape[0]} rows, expected {self.n_head} heads x "
                                  f"{self.n_tokens} tokens", "decode the whole prompt in one micro-batch")
        p = rows.reshape(self.n_head, self.n_tokens, -1)[:, :, : self.n_tokens]
        self.rows[int(name.rsplit("-", 1)[1])] = p.mean(axis=0, dtype=np.float64)
        return None

    def result(self) -> np.ndarray:
        """[L, T, T] in the order of ``diag_layers``."""
        if not self.rows:
            raise SCRExportError("the diagnostic pass saw no attention probabilities",
                                 "run with flash attention off (kq_soft_max exists only then)")
        missing = [i for i in self.layers if i not in self.rows]
        if missing:
            raise SCRExportError(f"the diagnostic pass saw no attention probabilities for layers {missing} "
                                 f"(kq_soft_max-L never fired there)", "this llama.cpp names its tensors "
                                 "differently: report it with the llama-cpp-python version")
        return np.stack([self.rows[i] for i in self.layers])
