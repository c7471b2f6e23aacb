"""The HTTP face of the engine: an OpenAI-compatible FastAPI app (chat completions, models, health, metrics).

``create_app(settings)`` builds the app; the model loads in the background after start-up, and ``/health`` says
``ready`` only once it has. ``scr-export serve`` runs the app with uvicorn (SIGTERM: the listening socket closes,
in-flight requests finish, then the process exits); ``ray_app.py`` runs the same app as a Ray Serve deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import Completion, Engine, EngineSettings
from .images import ImagePolicy
from .protocol import ChatRequest, RequestError


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    engine: EngineSettings
    images: ImagePolicy = ImagePolicy()
    drain_timeout_s: float = 30.0


def create_app(settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(settings.engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.ready:  # Ray's replicas load before they report healthy; a plain server loads in the background
            loader = asyncio.get_running_loop().run_in_executor(None, engine.load)
            loader.add_done_callback(lambda f: f.exception())  # the error stays on engine.load_error for /health
        yield
        engine.draining = True  # uvicorn has stopped accepting and waited for open responses; finish the rest
        deadline = time.monotonic() + settings.drain_timeout_s
        while not engine.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        engine.close()

    app = FastAPI(title="scr-export", version=_version(), lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        if exc.status >= 400 and exc.code not in ("queue_full",):
            engine.metrics.errors.labels(exc.code).inc()
        engine.metrics.requests.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            err = RequestError(f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
        else:
            param = ".".join(loc) or None
            err = RequestError(f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_request")
        return await request_error(request, err)

    @app.get("/health")
    async def health():
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.ready:
            status = "failed" if engine.load_error else "loading"
            return JSONResponse({"status": status, "error": engine.load_error}, status_code=503)
        return {"status": "ready", "model": engine.model_name}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type=engine.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        engine.check_ready()
        m = engine.runtime.manifest
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": 0, "owned_by": "scr-export",
            "family": m.get("family"), "runtime": m.get("runtime", "onnx"), "precision": m.get("precision"),
            "provider": engine.runtime.provider, "scr": engine.runtime.config.to_dict()}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        t_request = time.perf_counter()
        engine.check_ready()
        job = await asyncio.to_thread(engine.build_job, body, settings.images.load)
        admission = engine.admit()
        admission.__enter__()
        cancel = threading.Event()
        try:
            events = engine.start(job, cancel, t_request)
        except BaseException:
            admission.__exit__(None, None, None)
            raise
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if job.stream:
            # the first event decides: an error before any token (context, SCR options) is still a 4xx
            first = await events.get()
            if first[0] == "error":
                admission.__exit__(None, None, None)
                _raise(first[1])
            return StreamingResponse(_sse(first, events, cancel, admission, rid, created, job.model, engine),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    _raise(value)
                if kind == "done":
                    break
        finally:
            watcher.cancel()
            admission.__exit__(None, None, None)
        done: Completion = value
        engine.metrics.requests.labels("200").inc()
        return {"id": rid, "object": "chat.completion", "created": created, "model": job.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": _finish(done.finish_reason)}],
                "usage": _usage(done), "scr": {"enabled": job.scr, "timings_s": done.timings}}

    return app


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _raise(exc: BaseException):
    if isinstance(exc, RequestError):
        raise exc
    raise RequestError(f"the runtime failed: {exc.__class__.__name__}: {exc}", code="runtime_error",
                       status=500) from exc


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """A client that goes away stops its request's decoding at the next token."""
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.05)


async def _sse(first, events, cancel: threading.Event, admission, rid: str, created: int, model: str, engine):
    """Server-sent events in OpenAI's chunk format, then ``data: [DONE]``."""

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    status = "200"
    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            kind, value = event
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "error":
                status = "500"
                err = value if isinstance(value, RequestError) else RequestError(
                    f"the runtime failed: {value.__class__.__name__}: {value}", code="runtime_error", status=500)
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            else:
                yield chunk({}, _finish(value.finish_reason), _usage(value))
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnected and the response task was cancelled
        cancel.set()
        engine.metrics.requests.labels(status).inc()
        admission.__exit__(None, None, None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scr-export")
    except PackageNotFoundError:
        return "0"
