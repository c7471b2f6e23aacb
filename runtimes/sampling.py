"""How every runner picks the next token, and how it hands tokens out while it decodes.

Greedy stays the default (parity with the reference is measured greedy). ``Sampling(temperature, top_p, seed)``
draws from the softmax of the logits (after the runner's suppressed ids are masked) with nucleus truncation and a
seeded generator per request, so the same request gives the same tokens on every runtime that computes the same
logits. ``TokenSink``: called with (row, token) after each token is chosen; returning False stops the decoding
(a client that went away, a stop sequence reached).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from scr_export.errors import SCRExportError

TokenSink = Callable[[int, int], bool]


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 2.0 and np.isfinite(self.temperature)):
            raise SCRExportError(f"temperature {self.temperature} is outside 0..2", "use 0 (greedy) to 2")
        if not (0.0 < self.top_p <= 1.0):
            raise SCRExportError(f"top_p {self.top_p} is outside (0, 1]", "use a value in (0, 1]; 1 keeps all tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def picker(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from masked logits [B, V] (float32, -inf where suppressed) to the chosen ids [B] (int64);
        one per request: it owns the request's random generator."""
        if self.greedy:
            return lambda logits: logits.argmax(-1).astype(np.int64)
        rng = np.random.default_rng(self.seed)
        temperature, top_p = self.temperature, self.top_p

        def pick(logits: np.ndarray) -> np.ndarray:
            out = np.empty(logits.shape[0], np.int64)
            for b, row in enumerate(np.asarray(logits, np.float64)):
                z = row / temperature
                p = np.exp(z - z.max())
                p /= p.sum()
                order = np.argsort(-p, kind="stable")
                keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
                q = p[keep] / p[keep].sum()
                out[b] = keep[rng.choice(len(keep), p=q)]
            return out

        return pick


GREEDY = Sampling()
