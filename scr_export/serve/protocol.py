"""OpenAI chat-completions requests in, one validated job out; every problem a 4xx with a JSON error that names it.

The request is parsed with pydantic (FastAPI's), then checked against the served model: one user turn (with an
optional system message), at most ``max_images`` images, ``max_tokens`` > 0, sampling within range, SCR options
the model can take. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request",
                 status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.headers = message, param, code, status, headers

    def body(self) -> dict[str, Any]:
        kind = {429: "rate_limit_error", 503: "server_unavailable"}.get(self.status, "invalid_request_error")
        if self.status >= 500 and self.status != 503:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool fields: ignored
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = None


class SCROptions(BaseModel):
    """The extension field ``scr``: SCR per request (within what the model was converted with)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    enabled: bool = True
    k: int | None = Field(default=None, ge=1)
    lam: float | None = Field(default=None, alias="lambda", gt=0)
    layers: tuple[int, int] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, logit_bias...) are accepted, unused
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = 1
    scr: SCROptions | None = None


@dataclasses.dataclass
class ChatJob:
    """What the engine runs for one request."""

    images: list[Any]          # PIL images, in message order
    prompt: str                # the text the runtime's prompt template wraps (as `scr-export run --prompt`)
    max_tokens: int
    sampling: Any              # runtimes.sampling.Sampling
    stop: list[str]
    stream: bool
    scr: bool
    config: Any                # the SCRConfig for this request (the model's, with the request's k / lambda / layers)
    model: str


def parse_messages(request: ChatRequest, load_image, max_images: int) -> tuple[list[Any], str]:
    """(images, prompt) from one user turn and an optional system message before it."""
    turns = [m for m in request.messages if m.role not in ("system", "developer")]
    if len(turns) != 1 or turns[0].role != "user":
        raise RequestError("this server takes one user message (with an optional system message before it); the "
                           f"request has {[m.role for m in request.messages]}: the families' prompt templates here "
                           "are single-turn", param="messages", code="unsupported_conversation")
    texts, images = [], []
    for j, m in enumerate(request.messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        for i, part in enumerate(parts):
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif m.role != "user":
                raise RequestError(f"a {m.role} message cannot hold images", param="messages", code="invalid_image")
            else:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(load_image(url, f"messages[{j}].content[{i}]"))
    if len(images) > max_images:
        raise RequestError(f"the request has {len(images)} images; this server takes at most {max_images} per "
                           "request (each costs hundreds of positions)", param="messages", code="too_many_images")
    prompt = "\n".join(t for t in texts if t)
    if not prompt.strip():
        raise RequestError("the user message has no text", param="messages", code="empty_prompt")
    return images, prompt


def resolve_max_tokens(request: ChatRequest, default: int) -> int:
    value = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if value is None:
        return default
    if value <= 0:
        raise RequestError(f"max_tokens must be at least 1, got {value}", param="max_tokens",
                           code="invalid_max_tokens")
    return value


def resolve_stop(request: ChatRequest) -> list[str]:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise RequestError("stop takes up to 4 non-empty strings", param="stop", code="invalid_stop")
    return stop
