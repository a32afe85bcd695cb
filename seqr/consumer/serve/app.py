"""The FastAPI app: thin handlers over the engine, the live registry and the page.

Handlers read the body with a byte limit (413), parse it with the project's strict JSON parser
(400), validate it (schemas.py, 400), resolve the model against the version live *now* (404) and
bind the request to that version, tokenize off the event loop (400 over the limits), queue the
sequences (429 when full) and answer as JSON or server-sent events. Every error a client can
cause is an OpenAI-style 4xx; anything else is a 500 with no traceback, and the server goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from seqr.consumer.serve.config import ServeConfig
from seqr.consumer.serve.engine import Engine, Job
from seqr.consumer.serve.errors import ApiError, error_body
from seqr.consumer.serve.generation import Generation, header_value
from seqr.consumer.serve.live import AUTO, LiveRegistry, ServedVersion
from seqr.consumer.serve.metrics import ServeMetrics
from seqr.consumer.serve.page import content_security_policy, render
from seqr.consumer.serve.pool import QueryPool
from seqr.consumer.serve.prompts import Prompt, Prompter
from seqr.consumer.serve.schemas import ChatRequest, CompletionRequest, parse, sampling
from seqr.core.errors import FormatError
from seqr.core.strict_json import loads_strict

log = logging.getLogger("seqr.serve")
ENDPOINTS = (
    "/",
    "/health",
    "/metrics",
    "/api/status",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
)


@dataclass
class ServeState:
    """Everything the handlers use."""

    config: ServeConfig
    live: LiveRegistry
    engine: Engine
    pool: QueryPool | None
    metrics: ServeMetrics
    prompter: Prompter


class _Measure:
    """ASGI middleware: requests and latency per endpoint, observed when the last byte of the
    answer is sent (so a stream counts until its end)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"

        async def measured(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.metrics.answered(endpoint, status[0], time.perf_counter() - started)

        try:
            await self.app(scope, receive, measured)
        except Exception:
            self.metrics.answered(endpoint, 500, time.perf_counter() - started)
            raise


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed strictly, at most ``limit`` bytes (413 beyond, counted as it arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(
            413,
            f"the request body is over this server's limit of {limit} bytes",
            code="body_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413,
                f"the request body is over this server's limit of {limit} bytes",
                code="body_too_large",
            )
        chunks.append(chunk)
    try:
        return loads_strict(b"".join(chunks), what="the request body", max_bytes=limit)
    except FormatError as exc:
        raise ApiError(400, f"{exc}; send one JSON object", code="invalid_json") from None


def resolve(version: ServedVersion, model: str, base_id: str) -> tuple[bool, int | None]:
    """(auto, adapter index or None for the base model) for a request's ``model``."""
    if model == AUTO:
        return True, None
    if model == base_id:
        return False, None
    if model in version.ids:
        return False, version.ids[model]
    raise ApiError(
        404,
        f"model {model[:100]!r} does not exist; GET /v1/models lists "
        f"'{AUTO}', '{base_id}' and the adapters",
        param="model",
        code="model_not_found",
    )


async def prepare(state: ServeState, kind: str, body: Any) -> tuple[Any, list[Prompt], Any]:
    """(request, prompts, sampling parameters) of a completions or chat body; ApiError 4xx."""
    limits = state.config.limits
    if kind == "completion":
        req = parse(CompletionRequest, body)
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts or len(texts) > limits.max_prompts:
            raise ApiError(
                400,
                f"prompt must be text or a list of 1-{limits.max_prompts} texts",
                param="prompt",
                code="invalid_value",
            )
        params = sampling(req, limits, req.max_tokens, limits.default_max_tokens)
        names = ["prompt"] if len(texts) == 1 else [f"prompt[{i}]" for i in range(len(texts))]
        prompts: list[Prompt] = await run_in_threadpool(
            lambda: [state.prompter.completion(t, n) for t, n in zip(texts, names, strict=True)]
        )
    else:
        req = parse(ChatRequest, body)
        wanted = req.max_completion_tokens or req.max_tokens
        params = sampling(req, limits, wanted, limits.default_chat_max_tokens)
        prompts = [await run_in_threadpool(state.prompter.chat, req.messages)]
    for prompt in prompts:
        state.prompter.check_room(prompt, params.max_tokens)
    return req, prompts, params


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="seqr serve", docs_url=None, redoc_url=None, openapi_url=None)
    cfg, limits = state.config, state.config.limits

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, "invalid request"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s", request.url.path)
        return JSONResponse(
            error_body(500, "the server failed to answer; it keeps serving"), status_code=500
        )

    async def generate(kind: str, request: Request) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        version = state.live.current  # the request is bound to this version to its end
        req, prompts, params = await prepare(state, kind, body)
        auto, adapter = resolve(version, req.model, cfg.base_model_id)
        n = req.n or 1
        jobs = [
            Job(
                version,
                prompt.ids,
                prompt.route_on if auto else None,
                adapter,
                replace(params, seed=None if params.seed is None else params.seed + i),
                sink=lambda event: None,
            )
            for prompt in prompts
            for i in range(n)
        ]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        run = Generation(state.engine, kind, req.model, jobs, n, include_usage)  # type: ignore[arg-type]
        run.start()
        try:
            routes = await run.routes()
        except BaseException:
            run.cancel()
            raise
        headers = {"X-Seqr-Adapter": header_value(routes, cfg.base_model_id)}
        if req.stream:
            headers["Cache-Control"] = "no-cache"
            return StreamingResponse(run.stream(), media_type="text/event-stream", headers=headers)
        try:
            return JSONResponse(await run.complete(), headers=headers)
        finally:
            run.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate("chat", request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        version = state.live.current
        created = int(version.loaded_at.timestamp())
        data = [
            {
                "id": AUTO,
                "object": "model",
                "created": created,
                "owned_by": "seqr",
                "seqr": {"routed": True},
            },
            {
                "id": cfg.base_model_id,
                "object": "model",
                "created": created,
                "owned_by": "seqr",
                "seqr": {"base_model": state.live.base.name},
            },
        ]
        for i, adapter in enumerate(version.router.adapters):
            data.append(
                {
                    "id": version.names[i],
                    "object": "model",
                    "created": created,
                    "owned_by": adapter.entry.client,
                    "seqr": {
                        "adapter_sha256": adapter.entry.adapter_sha256,
                        "admitted": adapter.entry.admitted.isoformat(),
                        "registry_version": version.version,
                    },
                }
            )
        return {"object": "list", "data": data}

    def status() -> dict[str, Any]:
        version = state.live.current
        calibration = state.engine.calibration_for(version)
        reload = state.live.last_reload
        return {
            "status": "ok",
            "registry_version": version.version,
            "adapters": list(version.names),
            "routed": state.engine.routed_counts(),
            "calibration": calibration.describe(),
            "pool_prompts": 0 if state.pool is None else len(state.pool),
            "waiting": state.engine.waiting,
            "running": state.engine.running,
            "last_reload": {
                "outcome": reload.outcome,
                "at": reload.at.isoformat(),
                "message": reload.message,
                "version": reload.version,
            },
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return status()

    @app.get("/api/status")
    async def api_status() -> dict[str, Any]:
        return status()

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if state.pool is not None:
            state.metrics.pool_prompts.set(len(state.pool))
        calibration = state.engine.calibration_for(state.live.current)
        state.metrics.queries_in_use.set(1 if calibration.kind == "queries" else 0)
        state.metrics.soft_votes_in_use.set(1 if calibration.votes is not None else 0)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        version = state.live.current
        html, nonce = render(
            version,
            state.engine.calibration_for(version),
            state.engine.routed_counts(),
            0 if state.pool is None else len(state.pool),
            state.live.last_reload,
        )
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": content_security_policy(nonce),
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    app.add_middleware(_Measure, metrics=state.metrics)
    return app
