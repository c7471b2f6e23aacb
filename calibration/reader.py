"""The calibration reader: ONNX Runtime's ``CalibrationDataReader`` fed by the deployed pipeline **with SCR on**.

For every calibration pair the float graphs of the converted directory run exactly as `scr-export run` runs them
(vision → embeddings → float diagnostic pass → the sample's own plan → prefill with the plan → greedy decode steps
with the KV cache and the identity plan), and the reader hands the calibrator every feed the chosen graph received:
the prefill (redistributed rows included) and the decode steps (seq 1, past filled). So activation ranges cover
both phases and the rows SCR edits. ``scr=False`` gives the same feeds with the identity plan (the on/off report).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from onnxruntime.quantization import CalibrationDataReader

from .data import CalibrationSample

DEFAULT_DECODE_STEPS = 4


class SCRCalibrationReader(CalibrationDataReader):
    """Feeds for ``graph`` ("decoder" or "diagnostic") of ``runner`` (an ``OrtVLM`` on the float graphs)."""

    def __init__(self, runner: Any, samples: list[CalibrationSample], *, graph: str = "decoder", scr: bool = True,
                 decode_steps: int = DEFAULT_DECODE_STEPS, progress: bool = True):
        if graph not in ("decoder", "diagnostic"):
            raise ValueError(f"no calibration feeds for graph {graph!r}")
        if getattr(runner, "attention", "eager") != "eager":
            raise ValueError("the calibration reader records the eager decoder (the graph that is quantized): "
                             "open the runner with attention='eager'")
        self.runner, self.samples, self.graph, self.scr = runner, samples, graph, scr
        self.decode_steps = decode_steps
        self.progress = progress
        self.plans: list[Any] = []       # the plan each sample's prefill saw (tests check it is not the identity)
        self.feeds_seen = 0
        self.seconds = 0.0
        self._it = self._feeds()

    def _sample_feeds(self, sample: CalibrationSample) -> list[dict]:
        runner = self.runner
        inputs = runner.encode([[sample.image]], [sample.prompt])
        recorded: list[dict] = []
        runner.recorder = lambda name, feed: recorded.append(feed) if name == self.graph else None
        try:
            if self.graph == "diagnostic":
                self.plans.append(runner.plan(inputs))
            else:
                res = runner.generate(inputs, scr=self.scr, max_new_tokens=self.decode_steps + 1, stop_at_eos=False)
                self.plans.append(res.plan)
        finally:
            runner.recorder = None
        return recorded

    def per_sample(self) -> Iterator[list[dict]]:
        """Each sample's feeds as one list (prefill, then the decode steps)."""
        from tqdm.auto import tqdm

        what = "diagnostic pass" if self.graph == "diagnostic" else f"decoder, SCR {'on' if self.scr else 'off'}"
        bar = tqdm(total=len(self.samples), unit="sample", desc=f"calibrating ({what})", disable=not self.progress,
                   leave=False)
        t0 = time.perf_counter()
        try:
            for sample in self.samples:
                feeds = self._sample_feeds(sample)
                self.feeds_seen += len(feeds)
                yield feeds
                bar.update(1)
        finally:
            self.seconds = time.perf_counter() - t0
            bar.close()

    def _feeds(self) -> Iterator[dict]:
        for feeds in self.per_sample():
            yield from feeds

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return len(self.samples)
