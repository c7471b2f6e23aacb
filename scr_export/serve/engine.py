"""The serving engine: runtimes loaded once, a bounded queue in front of them, one request per runtime at a time.

``max_concurrency`` runtime instances (each a converted directory opened through ``runtimes.registry``, so ONNX
Runtime, llama.cpp and TensorRT directories serve alike) run in as many worker threads; up to ``queue`` more
requests wait; beyond that a request is refused at once (429, Retry-After). A request streams its text as tokens
come (``on_token`` of the runtime), stops at a stop sequence, and stops computing when its client goes away (the
cancel event is checked at every token). Nothing here knows HTTP: ``app.py`` maps it onto FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from scr_export.errors import SCRExportError

from .metrics import Metrics
from .protocol import ChatJob, ChatRequest, RequestError, parse_messages, resolve_max_tokens, resolve_stop


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    directory: Path
    runtime: str = "auto"
    device: str = "auto"
    threads: int | None = None
    max_concurrency: int = 1
    queue: int = 16
    default_max_tokens: int = 256
    max_images: int = 4
    model_name: str | None = None


@dataclasses.dataclass
class Completion:
    text: str
    finish_reason: str            # "stop" (end of sequence or a stop string), "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]


class Engine:
    def __init__(self, settings: EngineSettings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.model_name = settings.model_name or Path(settings.directory).resolve().name
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self._pool: queue.Queue = queue.Queue()
        self._executor = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="scr-serve")
        self._admitted = 0       # waiting + running
        self._running = 0
        self._lock = threading.Lock()
        self.runtime: Any = None  # the first instance: config, family, manifest for validation and /v1/models

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Open ``max_concurrency`` instances of the directory (blocking; the app calls it off the event loop)."""
        from runtimes.registry import open_runtime

        s = self.settings
        try:
            for _ in range(s.max_concurrency):
                rt = open_runtime(s.directory, s.runtime, device=s.device, threads=s.threads)
                self._pool.put(rt)
                self.runtime = self.runtime or rt
        except Exception as exc:  # reported by /health and the log; the server answers 503 meanwhile
            self.load_error = f"{exc.__class__.__name__}: {exc}"
            raise
        self.ready = True

    def idle(self) -> bool:
        return self._admitted == 0

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- admission -----------------------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.draining:
            raise RequestError("the server is shutting down", code="draining", status=503)
        if not self.ready:
            raise RequestError(f"the model is not loaded{': ' + self.load_error if self.load_error else ' yet'}",
                               code="loading", status=503, headers={"Retry-After": "5"})

    @contextlib.contextmanager
    def admit(self):
        """A place in the queue, or 429 at once (never a timeout)."""
        with self._lock:
            capacity = self.settings.max_concurrency + self.settings.queue
            if self._admitted >= capacity:
                self.metrics.errors.labels("queue_full").inc()
                raise RequestError(f"the server is busy: {self._admitted} requests are running or waiting "
                                   f"(capacity {capacity}); retry later", code="queue_full", status=429,
                                   headers={"Retry-After": "1"})
            self._admitted += 1
            self._gauges()
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1
                self._gauges()

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self._admitted - self._running)
        self.metrics.in_flight.set(self._running)

    # -- requests ------------------------------------------------------------------------------------------------
    def build_job(self, request: ChatRequest, load_image) -> ChatJob:
        """Validate ``request`` against the served model (images decoded here, off the event loop)."""
        from runtimes.sampling import Sampling

        if request.n != 1:
            raise RequestError("n must be 1", param="n", code="unsupported_n")
        if request.model not in (None, self.model_name):
            raise RequestError(f"this server serves {self.model_name!r}, not {request.model!r}", param="model",
                               code="model_not_found", status=404)
        images, prompt = parse_messages(request, load_image, self.settings.max_images)
        try:
            sampling = Sampling(temperature=request.temperature or 0.0,
                                top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed)
        except SCRExportError as exc:
            raise RequestError(exc.problem, param="temperature/top_p", code="invalid_sampling") from None
        opts = request.scr
        config = self.runtime.config
        if opts is not None:
            changes = {k: v for k, v in (("k", opts.k), ("lam", opts.lam), ("layers", opts.layers)) if v is not None}
            try:
                config = config.replace(**changes) if changes else config
                num_layers = self.runtime.manifest["decoder"]["num_layers"]
                if changes.get("layers") and max(changes["layers"]) >= num_layers:
                    raise SCRExportError(f"scr.layers {list(changes['layers'])} reach past the model's "
                                         f"{num_layers} layers", f"use layers within 0..{num_layers - 1}")
                check = getattr(self.runtime, "check_config", None)
                if check is not None:
                    check(config)
            except SCRExportError as exc:
                raise RequestError(f"scr: {exc.problem}" + (f" (fix: {exc.fix})" if exc.fix else ""),
                                   param="scr", code="invalid_scr_options") from None
        return ChatJob(images=images, prompt=prompt, max_tokens=resolve_max_tokens(request,
                       self.settings.default_max_tokens), sampling=sampling, stop=resolve_stop(request),
                       stream=request.stream, scr=opts.enabled if opts else True, config=config,
                       model=self.model_name)

    def start(self, job: ChatJob, cancel: threading.Event, t_request: float) -> asyncio.Queue:
        """Run ``job`` on a worker; returns the queue its events arrive on: ("delta", text) while tokens come,
        then ("done", Completion) or ("error", exception)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def work() -> None:
            try:
                put("done", self._work(job, cancel, put, t_request))
            except BaseException as exc:  # handed to the request; the worker lives on
                put("error", exc)

        self._executor.submit(work)
        return events

    def _work(self, job: ChatJob, cancel: threading.Event, put, t_request: float) -> Completion:
        runtime = self._pool.get()
        with self._lock:
            self._running += 1
            self._gauges()
        try:
            return self._generate(runtime, job, cancel, put, t_request)
        finally:
            self._pool.put(runtime)
            with self._lock:
                self._running -= 1
                self._gauges()

    def _generate(self, runtime: Any, job: ChatJob, cancel: threading.Event, put, t_request: float) -> Completion:
        tok = runtime.family.tokenizer
        eos, pad = tok.eos_token_id, tok.pad_token_id
        try:
            inputs = runtime.encode([job.images], [job.prompt], text_only=True)
        except SCRExportError as exc:
            raise _as_request_error(exc) from None
        state = {"ids": [], "sent": 0, "text": "", "finish": None, "first": None, "eos": False}

        def visible(text: str) -> str:
            """What may be sent: not a trailing partial UTF-8 character, not a possible start of a stop string."""
            hold = len(text) - 1 if text.endswith("\ufffd") else len(text)
            for s in job.stop:
                for n in range(min(len(s) - 1, hold), 0, -1):
                    if text[:hold].endswith(s[:n]):
                        hold -= n
                        break
            return text[:hold]

        def on_token(row: int, token: int) -> bool:
            if state["first"] is None:
                state["first"] = time.perf_counter()
                self.metrics.ttft.observe(state["first"] - t_request)
            if cancel.is_set():
                state["finish"] = "cancelled"
                return False
            if token in (eos, pad):
                state["finish"], state["eos"] = "stop", True
                return False
            state["ids"].append(token)
            if not (job.stream or job.stop):  # nothing to look at before the end: decoded once, after it
                return True
            text = tok.decode(state["ids"])
            for s in job.stop:
                at = text.find(s)
                if at >= 0:
                    text, state["finish"] = text[:at], "stop"
            state["text"] = text
            out = text if state["finish"] else visible(text)
            if job.stream and len(out) > state["sent"]:
                put("delta", out[state["sent"]:])
                state["sent"] = len(out)
            return state["finish"] is None

        try:
            result = runtime.generate(inputs, scr=job.scr, max_new_tokens=job.max_tokens, config=job.config,
                                      sampling=job.sampling, on_token=on_token)
        except SCRExportError as exc:
            raise _as_request_error(exc) from None
        text = state["text"] if (job.stream or job.stop) else tok.decode(state["ids"])
        if job.stream and len(text) > state["sent"]:
            put("delta", text[state["sent"]:])
        finish = state["finish"] or ("length" if len(state["ids"]) >= job.max_tokens else "stop")
        n_tokens = len(state["ids"]) + int(state["eos"])
        timings = dict(result.timings)
        t_end = time.perf_counter()
        self.metrics.tokens.inc(len(state["ids"]))
        self.metrics.duration.observe(t_end - t_request)
        if "diagnostic" in timings:
            self.metrics.diagnostic.observe(timings["diagnostic"])
        if state["first"] is not None and len(state["ids"]) > 1:
            self.metrics.tokens_per_second.observe((len(state["ids"]) - 1) / max(t_end - state["first"], 1e-9))
        return Completion(text=text, finish_reason=finish, prompt_tokens=int(inputs.shape[1]),
                          completion_tokens=n_tokens, timings=timings)


def _as_request_error(exc: SCRExportError) -> RequestError:
    message = exc.problem + (f" (fix: {exc.fix})" if exc.fix else "")
    code = "context_length_exceeded" if "exceed" in message else "invalid_request"
    return RequestError(message, param="messages" if code == "context_length_exceeded" else None, code=code)
