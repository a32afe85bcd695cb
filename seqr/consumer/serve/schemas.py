"""Request bodies of the OpenAI API (completions, chat completions) and the responses' shapes.

Parsed with pydantic in strict mode (no "5" for 5, no true for 1) from JSON that
seqr.core.strict_json already refused if malformed, duplicated or non-finite. Fields that would
change the output but are not implemented (echo, logprobs, penalties, tools, ...) are refused
with a 400 naming them rather than silently ignored; unknown fields are ignored, as OpenAI-
compatible servers do. ``ignore_eos`` is vLLM's extension (generate exactly max_tokens).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seqr.consumer.serve.config import LimitsConfig
from seqr.consumer.serve.errors import ApiError
from seqr.consumer.serve.sampling import SamplingParams

MAX_SEED = (1 << 63) - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something this server does not do: name -> value."""
        out = {}
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                out[name] = getattr(self, name)
        if self.logit_bias:
            out["logit_bias"] = "..."
        return out


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.echo:
            out["echo"] = True
        if self.logprobs:
            out["logprobs"] = self.logprobs
        if self.best_of not in (None, 1):
            out["best_of"] = self.best_of
        if self.suffix:
            out["suffix"] = "..."
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> dict[str, Any]:
        out = super().unsupported()
        if self.logprobs:
            out["logprobs"] = True
        if self.tools:
            out["tools"] = "..."
        if self.tool_choice not in (None, "none", "auto"):
            out["tool_choice"] = "..."
        if self.response_format not in (None, {"type": "text"}):
            out["response_format"] = "..."
        return out


def parse(kind: type[_Common], body: Any) -> Any:
    """The request model, or ApiError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        field = where.split(".")[0] if where else None
        raise ApiError(
            400,
            f"{where}: {first['msg']}" if where else first["msg"],
            param=field,
            code="invalid_value",
        ) from None
    bad = request.unsupported()
    if bad:
        name = next(iter(bad))
        raise ApiError(
            400,
            f"{name} is not supported by this server; leave it out",
            param=name,
            code="unsupported_parameter",
        )
    return request


def sampling(
    request: _Common, limits: LimitsConfig, max_tokens: int | None, default: int
) -> SamplingParams:
    """The request's sampling parameters within the server's limits (ApiError 400 beyond)."""
    if request.n is not None and request.n > limits.max_n:
        raise ApiError(
            400,
            f"n = {request.n} is over this server's limit of {limits.max_n}",
            param="n",
            code="too_many",
        )
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > limits.max_stop:
        raise ApiError(
            400,
            f"stop holds {len(stop)} strings; at most {limits.max_stop}",
            param="stop",
            code="too_many",
        )
    for s in stop:
        if not s or len(s) > limits.max_stop_chars:
            raise ApiError(
                400,
                f"each stop string must be 1-{limits.max_stop_chars} characters",
                param="stop",
                code="invalid_value",
            )
    wanted = max_tokens if max_tokens is not None else default
    if wanted > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens = {wanted} is over this server's limit of {limits.max_tokens}",
            param="max_tokens",
            code="too_many_tokens",
        )
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    return SamplingParams(
        max_tokens=wanted,
        temperature=temperature,
        top_p=top_p,
        seed=request.seed,
        stop=tuple(stop),
        ignore_eos=request.ignore_eos,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
