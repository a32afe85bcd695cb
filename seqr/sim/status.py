"""What a running `seqr simulate` is doing: one line per client change, and status.json.

The nodes' progress files (seqr/node/progress.py, in work/progress/) are followed by a
background thread while Flower runs: each client's stage and training step (with its loss)
is printed as one line when it changes, and ``status.json`` in --out is rewritten atomically
(stage, per-client state, counts, ETA), so another terminal can watch the run with
``watch cat runs/X/status.json``. Evaluation stages report through the same board.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from seqr.core.atomic_write import write_atomic
from seqr.core.errors import FormatError
from seqr.node.progress import FINAL_STAGES, read_progress

STATUS_FORMAT = "seqr/status/v1"
STATUS_NAME = "status.json"
POLL_S = 2.0  # seconds between reads of the progress files
log = logging.getLogger("seqr.simulate")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@dataclass
class StatusBoard:
    """The run's status: stages with their wall time, clients, counts and an ETA."""

    out: Path
    clients: list[str]
    progress_dir: Path | None = None
    echo: Callable[[str], None] = print
    started: float = field(default_factory=time.time)
    stage: str = "starting"
    detail: str = ""
    stage_done: int = 0
    stage_total: int = 0
    stages: list[dict[str, Any]] = field(default_factory=list)
    client_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    _stage_started: float = field(default_factory=time.time)
    _shown: dict[str, tuple[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _written: float = 0.0  # when status.json was last written

    # ---- stages ---------------------------------------------------------------------
    def begin(self, stage: str, detail: str = "", total: int = 0) -> None:
        """Close the current stage (its wall time is kept) and start ``stage``."""
        with self._lock:
            self._close_stage()
            self.stage, self.detail, self.stage_done, self.stage_total = stage, detail, 0, total
            self._stage_started = time.time()
            self._write()
        self.echo(f"[seqr] {stage}" + (f": {detail}" if detail else ""))

    def advance(self, done: int) -> None:
        """Work units done within the current stage (status.json at most once a second)."""
        with self._lock:
            self.stage_done = done
            if time.time() - self._written >= 1.0 or done >= self.stage_total:
                self._write()

    def finish(self, stage: str = "done") -> None:
        with self._lock:
            self._close_stage()
            self.stage, self.detail = stage, ""
            self._write()

    def _close_stage(self) -> None:
        if self.stage not in ("starting", "done", "failed"):
            seconds = round(time.time() - self._stage_started, 1)
            self.stages.append({"stage": self.stage, "seconds": seconds})

    def stage_seconds(self) -> list[dict[str, Any]]:
        return list(self.stages)

    # ---- clients --------------------------------------------------------------------
    def poll(self) -> None:
        """Read every progress file once; print a line for each client whose stage changed
        or whose training moved on by a tenth of its steps; rewrite status.json."""
        if self.progress_dir is None or not self.progress_dir.is_dir():
            return
        lines = []
        with self._lock:
            for name in self.clients:
                try:
                    state = read_progress(self.progress_dir / f"{name}.json")
                except FileNotFoundError:
                    continue
                except (OSError, FormatError) as exc:
                    log.warning("progress of %s unreadable: %s", name, exc)
                    continue
                self.client_state[name] = state
                line = self._client_line(name, state)
                if line:
                    lines.append(line)
            eta = self.eta_s(time.time()) if self.stage == "federation" else None
            if lines and eta is not None:
                lines[-1] += f"; federation ETA {_duration(eta)}"
            self._write()
        for line in lines:
            self.echo(line)

    def _client_line(self, name: str, state: dict[str, Any]) -> str | None:
        stage, step, steps = state["stage"], state["step"], state["steps"]
        tenth = max(1, steps // 10)
        last = self._shown.get(name)
        if (
            last is not None
            and last[0] == stage
            and (stage != "training" or step // tenth == last[1] // tenth)
        ):
            return None
        self._shown[name] = (stage, step)
        index = self.clients.index(name) + 1
        what = stage
        if stage == "training" and steps:
            loss = state.get("loss")
            what = f"training step {step}/{steps}" + ("" if loss is None else f", loss {loss:.3f}")
        elif stage in ("rejected", "failed") and state.get("reason"):
            what = f"{stage}: {state['reason']}"
        elapsed = _duration(state["updated"] - state["started"])
        return f"[client {index}/{len(self.clients)}] {name}: {what} ({elapsed})"

    def counts(self) -> dict[str, int]:
        out = {"waiting": 0}
        for name in self.clients:
            stage = self.client_state.get(name, {}).get("stage", "waiting")
            out[stage] = out.get(stage, 0) + 1
        return {k: v for k, v in out.items() if v}

    def eta_s(self, now: float) -> float | None:
        """Seconds left: training at the rate of the steps done so far (federation), or the
        current stage's work units at its own rate (evaluation)."""
        if self.stage == "federation":
            states = [self.client_state.get(n) for n in self.clients]
            started = [s for s in states if s is not None and s["steps"]]
            if not started:
                return None
            steps = max(s["steps"] for s in started)
            done = sum(
                s["steps"] if s["stage"] != "training" else s["step"]
                for s in states
                if s is not None and (s["steps"] or s["stage"] in FINAL_STAGES)
            )
            first = min(s["started"] for s in started)
            if done <= 0 or now <= first:
                return None
            return (steps * len(self.clients) - done) * (now - first) / done
        if self.stage_total and self.stage_done:
            spent = now - self._stage_started
            return spent * (self.stage_total - self.stage_done) / self.stage_done
        return None

    # ---- status.json ----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        eta = self.eta_s(now)
        return {
            "format": STATUS_FORMAT,
            "stage": self.stage,
            "detail": self.detail,
            "stage_progress": {"done": self.stage_done, "total": self.stage_total},
            "started": _iso(self.started),
            "updated": _iso(now),
            "elapsed_seconds": round(now - self.started, 1),
            "eta_seconds": None if eta is None else round(eta, 1),
            "stages": self.stages,
            "counts": self.counts(),
            "clients": {
                name: {k: s.get(k) for k in ("stage", "step", "steps", "loss", "reason")}
                for name, s in (
                    (n, self.client_state.get(n, {"stage": "waiting"})) for n in self.clients
                )
            },  # fmt: skip
        }

    def _write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.snapshot(), indent=2, allow_nan=False).encode()
        write_atomic(self.out / STATUS_NAME, data)
        self._written = time.time()

    @contextlib.contextmanager
    def following(self, interval_s: float = POLL_S) -> Iterator[StatusBoard]:
        """Poll the progress files in a background thread while the block runs."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                with contextlib.suppress(Exception):  # a watcher must never stop the run
                    self.poll()

        thread = threading.Thread(target=run, name="seqr-status", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.poll()


def client_outcomes(board: StatusBoard, not_admitted: list[str]) -> list[dict[str, Any]]:
    """Per client, for the report: its verdict (the audited registry decides "admitted"),
    the reason when it has none, its training loss curve and its wall time per stage."""
    out = []
    for name in board.clients:
        state = board.client_state.get(name)
        if name not in not_admitted:
            verdict, reason = "admitted", ""
        elif state is None:
            verdict, reason = "no reply", "the client never reported progress"
        elif state["stage"] in ("failed", "rejected"):
            verdict, reason = state["stage"], state["reason"]
        else:
            verdict, reason = "not admitted", f"last seen {state['stage']}; not in the registry"
        times = dict(sorted((state or {}).get("stage_times", {}).items(), key=lambda kv: kv[1]))
        stages = list(times)
        seconds = {
            stage: round(times[nxt] - times[stage], 1)
            for stage, nxt in zip(stages, stages[1:], strict=False)
            if stage in ("starting", "training", "calibrating", "exporting")
        }
        out.append({
            "client": name,
            "verdict": verdict,
            "reason": reason,
            "losses": (state or {}).get("losses", []),
            "stage_seconds": seconds,
        })  # fmt: skip
    return out
