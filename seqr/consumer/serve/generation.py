"""One HTTP request's sequences, from the engine's events to an OpenAI response or SSE stream.

The engine thread delivers events through ``loop.call_soon_threadsafe`` into one asyncio queue
per request, tagged with the choice index (choice = prompt index * n + i, as OpenAI numbers
them). The route of every choice arrives before its first text, so a streaming response can
send the ``X-Seqr-Adapter`` header and the ``seqr`` field in its first chunk.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from seqr.consumer.serve.engine import Engine, Job, QueueFull, Route
from seqr.consumer.serve.errors import ApiError, error_body
from seqr.consumer.serve.schemas import new_id, now, usage

Kind = Literal["completion", "chat"]


@dataclass
class _Choice:
    route: Route | None = None
    text: list[str] = field(default_factory=list)
    finish: str | None = None
    tokens: int = 0


def header_value(routes: list[Route], base_id: str) -> str:
    """X-Seqr-Adapter: the adapter id per prompt, percent-encoded (ids come from the registry)."""
    return ",".join(quote(r.adapter if r.adapter is not None else base_id, safe="") for r in routes)


class Generation:
    """Generation(engine, kind, model, jobs, prompts, n): ``start()`` then ``complete()`` or
    ``stream()``; ``cancel()`` when the client is gone."""

    def __init__(
        self,
        engine: Engine,
        kind: Kind,
        model: str,
        jobs: list[Job],
        n: int,
        include_usage: bool = False,
    ) -> None:
        self.engine, self.kind, self.model, self.jobs, self.n = engine, kind, model, jobs, n
        self.include_usage = include_usage
        self.choices = [_Choice() for _ in jobs]
        self.id = new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = now()
        self._queue: asyncio.Queue[tuple[int, tuple[Any, ...]]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for index, job in enumerate(jobs):
            job.sink = functools.partial(self._deliver, loop, index)

    def _deliver(self, loop: asyncio.AbstractEventLoop, index: int, event: tuple[Any, ...]) -> None:
        """Called by the engine thread: hand the event to this request's event loop."""
        loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

    def start(self) -> None:
        try:
            self.engine.submit(self.jobs)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full") from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()

    async def _next(self) -> tuple[int, tuple[Any, ...]]:
        index, event = await self._queue.get()
        choice = self.choices[index]
        if event[0] == "route":
            choice.route = event[1]
        elif event[0] == "text":
            choice.text.append(event[1])
        elif event[0] == "done":
            choice.finish, choice.tokens = event[1], event[2]
        elif event[0] == "error":
            self.cancel()
            raise ApiError(event[1], event[2])
        return index, event

    async def routes(self) -> list[Route]:
        """Wait until every choice is routed; one Route per prompt."""
        while any(c.route is None for c in self.choices):
            await self._next()
        return [c.route for c in self.choices[:: self.n] if c.route is not None]

    async def complete(self) -> dict[str, Any]:
        """The whole response body once every choice is finished."""
        while any(c.finish is None for c in self.choices):
            await self._next()
        choices = []
        for index, c in enumerate(self.choices):
            text = "".join(c.text)
            if self.kind == "completion":
                choices.append(
                    {"index": index, "text": text, "finish_reason": c.finish, "logprobs": None}
                )
            else:
                choices.append(
                    {
                        "index": index,
                        "finish_reason": c.finish,
                        "logprobs": None,
                        "message": {"role": "assistant", "content": text},
                    }
                )
        return {
            "id": self.id,
            "object": "text_completion" if self.kind == "completion" else "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(),
            "seqr": self._seqr(),
        }

    async def stream(self) -> AsyncIterator[bytes]:
        """Server-sent events in OpenAI's format, ending with ``data: [DONE]``."""
        try:
            await self.routes()
            if self.kind == "chat":  # OpenAI's first chat chunk carries the role
                for index in range(len(self.choices)):
                    first = {"role": "assistant", "content": ""}
                    yield self._chunk(index, first, None, seqr=index == 0)
            else:
                yield self._chunk(0, "", None, seqr=True)
            finished = 0
            while finished < len(self.choices):
                index, event = await self._next()
                if event[0] == "text":
                    delta = event[1] if self.kind == "completion" else {"content": event[1]}
                    yield self._chunk(index, delta, None)
                elif event[0] == "done":
                    finished += 1
                    yield self._chunk(index, "" if self.kind == "completion" else {}, event[1])
            if self.include_usage:
                yield _sse({**self._head(), "choices": [], "usage": self._usage()})
        except ApiError as exc:
            yield _sse(error_body(exc.status, exc.message))
        finally:
            self.cancel()  # a client that left stops its rows at the next step
        yield b"data: [DONE]\n\n"

    # ----- pieces -------------------------------------------------------------------------
    def _head(self) -> dict[str, Any]:
        kind = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, index: int, delta: Any, finish: str | None, seqr: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        choice["text" if self.kind == "completion" else "delta"] = delta
        body = {**self._head(), "choices": [choice]}
        if seqr:
            body["seqr"] = self._seqr()
        return _sse(body)

    def _usage(self) -> dict[str, int]:
        prompt = sum(c.route.prompt_tokens for c in self.choices[:: self.n] if c.route)
        return usage(prompt, sum(c.tokens for c in self.choices))

    def _seqr(self) -> dict[str, Any]:
        """What was chosen and why: the first prompt's route (all of them when several)."""
        routes = [c.route.to_json() for c in self.choices[:: self.n] if c.route is not None]
        out = dict(routes[0]) if routes else {}
        if len(routes) > 1:
            out["prompts"] = routes
        return out


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
