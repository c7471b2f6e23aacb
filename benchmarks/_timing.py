"""Shared by the benchmark scripts: median wall time of repeated calls after warm-up."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
