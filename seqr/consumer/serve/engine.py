"""The batching engine: one thread owns the model; requests join between decoding steps.

A request becomes one Job per generated sequence (n choices of each prompt), bound to the
registry version that was live when it arrived. Jobs wait in a bounded queue (QueueFull beyond
it: HTTP 429). Between two decoding steps the engine takes as many waiting jobs as the batch has
room for and, per version:

1. routes the ``auto`` ones: one routing pass over their prompts (scoring.py) z-scored with the
   calibration in use (the adapters' own statistics, or query statistics: pool.py; with them
   soft token votes once the pool has their statistics), then adds each routed prompt's raw
   scores and votes to the pool;
2. prefills them with their adapters (peft ``adapter_names``), samples each first token and
   merges their KV cache into the version's running batch (batch.py).

Then every running batch (normally one; two while an old registry version drains after a
reload) takes one decoding step with mixed adapters. Events go back through each job's ``sink``
(a thread-safe callable): ("route", Route), ("text", str), ("done", reason, tokens) or
("error", status, message).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from seqr.consumer.serve.batch import decode, keep_rows, merge, prefill
from seqr.consumer.serve.config import EngineConfig
from seqr.consumer.serve.live import ServedVersion
from seqr.consumer.serve.pool import QueryPool
from seqr.consumer.serve.sampling import Sampler, SamplingParams, TextStream
from seqr.consumer.serve.scoring import (
    Calibration,
    Decision,
    check_close_pairs,
    decide,
    sequence_scores,
)
from seqr.core.errors import SeqrError
from seqr.core.model_routing.loss_check import prompt_losses

log = logging.getLogger("seqr.serve")
Event = tuple[Any, ...]


def route_prompts(
    version: ServedVersion, pool: QueryPool | None, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[Calibration, Decision]:
    """Step 1 of the module docstring for one batch of prompts: the calibration in use, one
    routing pass (with soft token votes under query statistics, pool.py), the decisions
    (close pairs under soft votes checked by the prompt's loss); each routed prompt then
    joins the pool."""
    if pool is None:
        return version.own, decide(sequence_scores(version.first_pass, ids, mask), version.own)
    calibration = pool.calibration(version.shas, version.names, version.modules, version.own)
    scored = sequence_scores(version.first_pass, ids, mask, pool.votes_under(calibration),
                             pool.config.vote_temperature)  # fmt: skip
    decision = decide(scored, calibration)
    if calibration.votes is not None and pool.config.loss_check_margin > 0:

        def losses_of(rows: list[int], adapters: list[int]) -> torch.Tensor:
            names = [version.internal(i) for i in adapters]
            return prompt_losses(version.peft_model, ids[rows], mask[rows], names)

        decision = check_close_pairs(decision, pool.config.loss_check_margin, losses_of)
    for row, best in enumerate(decision.indices):
        votes = None if scored.votes is None else scored.votes[row]
        pool.add(version.shas, version.modules, version.shas[best], scored.raw[row], votes,
                 calibration.routable)  # fmt: skip
    return calibration, decision


class QueueFull(SeqrError):
    """More sequences are waiting than the engine's queue holds."""


@dataclass(frozen=True)
class Route:
    """What a job runs with, and why (the response's ``seqr`` field)."""

    adapter: str | None  # model id of the adapter; None: the base model
    adapter_sha256: str | None
    routed: bool  # chosen by SEQR ("auto") rather than named
    margin: float | None  # score of the choice minus the runner-up's
    runner_up: str | None
    # the loss check: "kept" the scores' first or "changed" to the runner-up, and the
    # (choice's, runner-up's) loss on the prompt; None: it did not run
    loss_check: str | None
    prompt_losses: tuple[float, float] | None
    # per routable adapter: mean z-score, or standardised soft vote share (scoring.Decision)
    scores: dict[str, float] | None
    calibration: dict[str, Any] | None
    registry_version: int
    prompt_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "adapter_sha256": self.adapter_sha256,
            "routed": self.routed,
            "margin": self.margin,
            "runner_up": self.runner_up,
            "loss_check": self.loss_check,
            "prompt_losses": None if self.prompt_losses is None else list(self.prompt_losses),
            "scores": self.scores,
            "calibration": self.calibration,
            "registry_version": self.registry_version,
        }


@dataclass(eq=False)
class Job:
    """One sequence to generate."""

    version: ServedVersion
    prompt: list[int]
    route_on: list[int] | None  # auto: the tokens SEQR routes on; None: ``adapter`` as named
    adapter: int | None  # named adapter index (None: base model) when route_on is None
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Row:
    job: Job
    adapter: str  # peft name
    sampler: Sampler
    stream: TextStream
    generated: int = 0
    last: int = 0


@dataclass(eq=False)
class _Batch:
    version: ServedVersion
    rows: list[_Row]
    cache: Any
    mask: torch.Tensor


class Engine:
    """Engine(config, tokenizer, eos_ids, pool=None): ``submit`` jobs, ``start``, ``stop``."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        eos_ids: set[int],
        pool: QueryPool | None = None,
        metrics: Any = None,
    ) -> None:
        self.config, self.tokenizer, self.eos_ids = config, tokenizer, eos_ids
        self.pool, self.metrics = pool, metrics
        self._routed: Counter[str] = Counter()  # auto decisions per adapter id, all versions
        self._routed_lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._batches: dict[int, _Batch] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="seqr-engine", daemon=True)

    # ----- outside the engine thread ---------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in list(self._batches.values()))

    def routed_counts(self) -> dict[str, int]:
        """How often ``auto`` chose each adapter id since the start (every version)."""
        with self._routed_lock:
            return dict(self._routed)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none (QueueFull)."""
        with self._cond:
            if len(self._waiting) + len(jobs) > self.config.queue_size:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} sequences are waiting and the "
                    f"queue holds {self.config.queue_size}; retry shortly"
                )
            self._waiting.extend(jobs)
            self._cond.notify_all()
        self._gauge()

    def calibration_for(self, version: ServedVersion) -> Calibration:
        if self.pool is None:
            return version.own
        return self.pool.calibration(version.shas, version.names, version.modules, version.own)

    # ----- the engine thread ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._batches:
                    self._cond.wait()
                if self._stop:
                    return
                room = self.config.max_batch - self.running
                taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            taken = [job for job in taken if not job.cancelled.is_set()]
            for version in {id(j.version): j.version for j in taken}.values():
                group = [j for j in taken if j.version is version]
                self._guarded(group, functools.partial(self._admit, version, group))
            for key, batch in list(self._batches.items()):
                jobs = [r.job for r in batch.rows]
                self._guarded(jobs, functools.partial(self._step, batch), key)
            self._gauge()

    def _guarded(self, jobs: list[Job], work: Callable[[], None], key: int | None = None) -> None:
        """A failure fails these jobs only (and drops their batch); the engine goes on."""
        try:
            work()
        except Exception:  # noqa: BLE001 - the server must keep serving
            log.exception("engine step failed; %d sequence(s) get an error", len(jobs))
            if key is not None:
                self._batches.pop(key, None)
            for job in jobs:
                self._emit(
                    job,
                    (
                        "error",
                        500,
                        "the server failed while generating this "
                        "sequence; it keeps serving, retry the request",
                    ),
                )

    def _admit(self, version: ServedVersion, jobs: list[Job]) -> None:
        routes = self._route(version, jobs)
        device = self.config.device
        ids, mask = _left_pad([j.prompt for j in jobs], self.tokenizer.pad_token_id, device)
        adapters = [version.internal(routes[i][0]) for i in range(len(jobs))]
        started = time.perf_counter()
        out = prefill(version.peft_model, ids, mask, adapters)
        rows = []
        for i, job in enumerate(jobs):
            self._emit(job, ("route", routes[i][1]))
            row = _Row(
                job, adapters[i], Sampler(job.params), TextStream(self.tokenizer, job.params.stop)
            )
            rows.append(row)
        keep = [i for i, row in enumerate(rows) if self._advance(row, out.logits[i])]
        if self.metrics is not None:  # the prefill made every job's first token
            self.metrics.step(len(jobs), time.perf_counter() - started)
            self.metrics.prompt_tokens.inc(sum(len(j.prompt) for j in jobs))
            for job in jobs:
                self.metrics.first_token(time.perf_counter() - job.enqueued)
        if not keep:
            return
        cache, new_mask = keep_rows(out.cache, out.mask, keep)
        new_rows = [rows[i] for i in keep]
        batch = self._batches.get(id(version))
        if batch is None:
            self._batches[id(version)] = _Batch(version, new_rows, cache, new_mask)
        else:
            batch.cache, batch.mask = merge(batch.cache, batch.mask, cache, new_mask)
            batch.rows += new_rows

    def _route(self, version: ServedVersion, jobs: list[Job]) -> list[tuple[int | None, Route]]:
        """(adapter index or None, Route) per job; auto jobs share one routing pass."""
        auto = list({tuple(j.route_on): None for j in jobs if j.route_on is not None})
        decided: dict[tuple[int, ...], tuple[int, Route]] = {}
        if auto:
            ids, mask = _left_pad(
                [list(p) for p in auto], self.tokenizer.pad_token_id, self.config.device
            )
            calibration, decision = route_prompts(version, self.pool, ids, mask)
            routable = calibration.routable.tolist()
            for row, key in enumerate(auto):
                best, runner = decision.indices[row], decision.runner_up[row]
                scores = {
                    version.names[i]: float(decision.scores[row, i])
                    for i in range(len(version.names))
                    if routable[i]
                }
                decided[key] = (
                    best,
                    Route(
                        adapter=version.names[best],
                        adapter_sha256=version.shas[best],
                        routed=True,
                        margin=decision.margin[row],
                        runner_up=None if runner is None else version.names[runner],
                        loss_check=decision.loss_check[row],
                        prompt_losses=decision.prompt_losses[row],
                        scores=scores,
                        calibration=calibration.describe(),
                        registry_version=version.version,
                        prompt_tokens=0,
                    ),
                )
                with self._routed_lock:
                    self._routed[version.names[best]] += 1
                if self.metrics is not None:
                    self.metrics.routed(version.names[best], decision.loss_check[row])
        out: list[tuple[int | None, Route]] = []
        for job in jobs:
            index: int | None
            if job.route_on is not None:
                index, route = decided[tuple(job.route_on)]
            else:
                index = job.adapter
                route = Route(
                    adapter=None if index is None else version.names[index],
                    adapter_sha256=None if index is None else version.shas[index],
                    routed=False,
                    margin=None,
                    runner_up=None,
                    loss_check=None,
                    prompt_losses=None,
                    scores=None,
                    calibration=None,
                    registry_version=version.version,
                    prompt_tokens=0,
                )
            out.append((index, _with_tokens(route, len(job.prompt))))
        return out

    def _step(self, batch: _Batch) -> None:
        last = torch.tensor([r.last for r in batch.rows], device=batch.mask.device)
        started = time.perf_counter()
        out = decode(
            batch.version.peft_model, last, batch.cache, batch.mask, [r.adapter for r in batch.rows]
        )
        batch.cache, batch.mask = out.cache, out.mask
        keep = [i for i, row in enumerate(batch.rows) if self._advance(row, out.logits[i])]
        if self.metrics is not None:
            self.metrics.step(len(batch.rows), time.perf_counter() - started)
        if not keep:
            del self._batches[id(batch.version)]
        elif len(keep) < len(batch.rows):
            batch.cache, batch.mask = keep_rows(batch.cache, batch.mask, keep)
            batch.rows = [batch.rows[i] for i in keep]

    def _advance(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample the row's next token and send its text; False once the row is finished."""
        if row.job.cancelled.is_set():
            return False
        token = row.sampler(logits)
        row.generated += 1
        row.last = token
        reason = None
        if token in self.eos_ids and not row.job.params.ignore_eos:
            reason = "stop"
        else:
            delta = row.stream.push(token)
            if delta:
                self._emit(row.job, ("text", delta))
            if row.stream.stopped:
                reason = "stop"
            elif row.generated >= row.job.params.max_tokens:
                reason = "length"
        if reason is None:
            return True
        rest = row.stream.finish()
        if rest:
            self._emit(row.job, ("text", rest))
        self._emit(row.job, ("done", reason, row.generated))
        return False

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except RuntimeError:  # the request's event loop is gone (client or server left)
            job.cancelled.set()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(self.waiting, self.running)


def _with_tokens(route: Route, tokens: int) -> Route:
    from dataclasses import replace

    return replace(route, prompt_tokens=tokens)


def _left_pad(rows: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)
