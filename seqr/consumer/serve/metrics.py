"""Prometheus metrics of one server (its own CollectorRegistry, so servers never share one).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` units); tokens/s is
both a counter (``seqr_generated_tokens_total``: use rate()) and a gauge of the last decoding
steps for people reading /metrics directly. Labels are bounded: endpoint and status from fixed
sets, adapter ids from the registry (which bounds its size).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
THROUGHPUT_WINDOW_S = 10.0  # seconds of decoding steps behind the tokens/s gauge


class ServeMetrics:
    """Everything /metrics reports; methods are called by the app and the engine thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "seqr_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "seqr_request_latency_seconds",
            "time to the whole answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "seqr_time_to_first_token_seconds",
            "queue + routing + prefill",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("seqr_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("seqr_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens_per_s = Gauge(
            "seqr_tokens_per_second",
            f"tokens generated per second over the last {THROUGHPUT_WINDOW_S:g} s of decoding",
            registry=r,
        )
        self.decisions = Counter(
            "seqr_routing_decisions",
            "auto requests routed to each adapter",
            ["adapter"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "seqr_queue_depth", "sequences waiting to join the batch", registry=r
        )
        self.running = Gauge("seqr_running_sequences", "sequences being decoded", registry=r)
        self.registry_version = Gauge(
            "seqr_registry_version", "registry version served", registry=r
        )
        self.adapters = Gauge(
            "seqr_registry_adapters", "adapters in the served version", registry=r
        )
        self.reloads = Counter(
            "seqr_registry_reloads", "registry reloads by outcome", ["outcome"], registry=r
        )
        self.failed_reloads = Counter(
            "seqr_registry_failed_reloads",
            "reloads that kept the old version (audit or load failed)",
            registry=r,
        )
        self.swap_seconds = Gauge(
            "seqr_registry_load_seconds",
            "time the last loaded version took to audit and load",
            registry=r,
        )
        self.pool_prompts = Gauge(
            "seqr_calibration_pool_prompts",
            "served prompts in the query-statistics pool",
            registry=r,
        )
        self.queries_in_use = Gauge(
            "seqr_calibration_queries_in_use",
            "1 when routing z-scores with query statistics, 0 with the adapters' own",
            registry=r,
        )
        self.soft_votes_in_use = Gauge(
            "seqr_calibration_soft_votes_in_use",
            "1 when soft token votes decide (query statistics with vote statistics), else 0",
            registry=r,
        )
        self.loss_checks = Counter(
            "seqr_loss_checks",
            "auto prompts whose close pair the prompt's loss decided: the scores' first kept, "
            "or the runner-up chosen",
            ["outcome"],
            registry=r,
        )
        for outcome in ("loaded", "unchanged", "failed"):
            self.reloads.labels(outcome)
        for outcome in ("kept", "changed"):
            self.loss_checks.labels(outcome)
        self._steps: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    # ----- called by the engine thread ----------------------------------------------------
    def routed(self, adapter: str, loss_check: str | None = None) -> None:
        """One auto prompt routed; ``loss_check``: "kept" or "changed" where it ran."""
        self.decisions.labels(adapter).inc()
        if loss_check is not None:
            self.loss_checks.labels(loss_check).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def step(self, tokens: int, seconds: float) -> None:
        """One decoding step made ``tokens`` tokens in ``seconds``."""
        self.tokens.inc(tokens)
        now = time.monotonic()
        with self._lock:
            self._steps.append((now, tokens))
            while self._steps and self._steps[0][0] < now - THROUGHPUT_WINDOW_S:
                self._steps.popleft()
            span = max(now - self._steps[0][0], seconds, 1e-9)
            self.tokens_per_s.set(sum(t for _, t in self._steps) / span)

    def queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    # ----- called by the app ---------------------------------------------------------------
    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
