"""Assemble and run a server: base model once, live registry, engine, app, uvicorn, reloads.

``SeqrServer.run()`` serves in the main thread (SIGHUP reloads the registry; SIGINT/SIGTERM
stop uvicorn gracefully); ``start()`` serves from a background thread (tests, benchmarks) on a
socket bound before uvicorn starts, so ``port`` is known even when 0 asked for a free one.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

from seqr.consumer.router import RouterConfig
from seqr.consumer.serve.app import ServeState, create_app
from seqr.consumer.serve.config import ServeConfig
from seqr.consumer.serve.engine import Engine
from seqr.consumer.serve.live import AUTO, LiveRegistry, ReloadStatus, ServedVersion
from seqr.consumer.serve.metrics import ServeMetrics
from seqr.consumer.serve.pool import QueryPool
from seqr.consumer.serve.prompts import Prompter
from seqr.consumer.serve.source import RegistrySource
from seqr.core.base_model import BaseModel

log = logging.getLogger("seqr.serve")


def eos_ids(base: BaseModel) -> set[int]:
    """Token ids that end a sequence: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    for value in (
        base.tokenizer.eos_token_id,
        getattr(getattr(base.model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def build_state(config: ServeConfig, source: RegistrySource, base: BaseModel) -> ServeState:
    """Audit and load the registry onto ``base`` and wire the engine and app state."""
    base.model.to(config.engine.device).eval()
    metrics = ServeMetrics()

    def show(version: ServedVersion) -> None:
        metrics.registry_version.set(version.version)
        metrics.adapters.set(len(version.names))
        metrics.swap_seconds.set(version.build_seconds)

    def on_reload(status: ReloadStatus, version: ServedVersion) -> None:
        metrics.reloads.labels(status.outcome).inc()
        if status.outcome == "failed":
            metrics.failed_reloads.inc()
        show(version)

    engine_cfg = config.engine
    router_config = RouterConfig(
        device=engine_cfg.device, first_pass_dtype=engine_cfg.first_pass_dtype
    )
    live = LiveRegistry(
        source, base, router_config, reserved=(AUTO, config.base_model_id), on_reload=on_reload
    )
    show(live.current)  # the version loaded at start is not a reload
    pool = QueryPool(config.pool) if config.calibration == "queries" else None
    engine = Engine(config.engine, base.tokenizer, eos_ids(base), pool, metrics)
    context = int(getattr(base.model.config, "max_position_embeddings", 2048))
    prompter = Prompter(base.tokenizer, config.limits, context)
    return ServeState(config, live, engine, pool, metrics, prompter)


class SeqrServer:
    """The HTTP server around a ServeState, with the reload loop."""

    def __init__(self, state: ServeState) -> None:
        import uvicorn

        self.state = state
        cfg = state.config
        self.socket = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((cfg.host, cfg.port))
        self.socket.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        self.port = int(self.socket.getsockname()[1])
        uv = uvicorn.Config(
            create_app(state), log_level="warning", access_log=False, timeout_graceful_shutdown=30
        )
        self.uvicorn = uvicorn.Server(uv)
        self._reload = threading.Event()
        self._stopped = threading.Event()
        self._reloader = threading.Thread(target=self._reload_loop, name="seqr-reload", daemon=True)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.state.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def request_reload(self) -> None:
        """Re-read and audit the registry soon (what SIGHUP does)."""
        self._reload.set()

    def _reload_loop(self) -> None:
        every = self.state.config.refresh_s
        while not self._stopped.is_set():
            self._reload.wait(timeout=every)
            if self._stopped.is_set():
                return
            self._reload.clear()
            self.state.live.reload()

    def _begin(self) -> None:
        self.state.engine.start()
        self._reloader.start()

    def _end(self) -> None:
        self._stopped.set()
        self._reload.set()
        self.state.engine.stop()

    def run(self) -> None:
        """Serve in this (main) thread until SIGINT/SIGTERM; in-flight requests finish."""
        # uvicorn handles SIGINT/SIGTERM while it serves and afterwards re-raises the signal
        # into the handler that was there before: a no-op here, so the process exits cleanly.
        handlers = {sig: signal.signal(sig, lambda signum, frame: None)
                    for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
        handlers[signal.SIGHUP] = signal.signal(
            signal.SIGHUP, lambda signum, frame: self.request_reload()
        )
        self._begin()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._end()

    def start(self, timeout: float = 30.0) -> SeqrServer:
        """Serve from a background thread; returns once the server accepts connections."""
        self._begin()
        self._thread = threading.Thread(
            target=self.uvicorn.run,
            kwargs={"sockets": [self.socket]},
            name="seqr-uvicorn",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._end()
        self.socket.close()
