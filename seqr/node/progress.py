"""A node's progress file: what its run is doing now, for whoever watches that machine.

Training takes minutes per node and runs inside Flower's worker processes (a Ray actor in
simulation, a SuperNode's ClientApp process in deployment), whose logs the person running
the federation does not see. The ClientApp therefore writes ``<progress-dir>/<adapter>.json``
(atomically, at each stage and at most once a second while training) when the node setting
``progress-dir`` is set; ``seqr simulate`` follows these files (seqr/sim/status.py).

The file holds no private content: the adapter's name (which the node publishes anyway), the
stage, step counts, the training loss per step, times, and for a failed or refused run the
same public reason the server is told. No text, token ids, file names or paths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqr.core.atomic_write import write_atomic
from seqr.core.errors import FormatError
from seqr.core.strict_json import loads_strict

PROGRESS_FORMAT = "seqr/progress/v1"
STAGES = ("starting", "training", "calibrating", "exporting", "submitted", "admitted",
          "rejected", "failed")  # fmt: skip
FINAL_STAGES = frozenset({"admitted", "rejected", "failed"})
MAX_PROGRESS_BYTES = 64 * 1024  # bytes; a progress file is a few kB
MAX_LOSS_POINTS = 256  # loss curve points kept (older ones thinned out, first and last kept)
MAX_REASON_CHARS = 300
WRITE_INTERVAL_S = 1.0  # seconds between writes while training
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def progress_path(folder: Path, name: str) -> Path:
    if not _NAME.match(name):
        raise FormatError(f"progress name {name!r} is not a valid adapter name")
    return Path(folder) / f"{name}.json"


@dataclass
class NodeProgress:
    """Writes one node's progress file; every method is a no-op when ``folder`` is None."""

    folder: Path | None
    name: str
    state: dict[str, Any] = field(default_factory=dict)
    _written: float = 0.0

    def __post_init__(self) -> None:
        now = time.time()
        self.state = {"format": PROGRESS_FORMAT, "client": self.name, "stage": "starting",
                      "step": 0, "steps": 0, "loss": None, "losses": [], "started": now,
                      "stage_started": now, "stage_times": {"starting": now}, "updated": now,
                      "reason": ""}  # fmt: skip

    @classmethod
    def resume(cls, folder: Path | None, name: str) -> NodeProgress:
        """Continue the file an earlier message of this node wrote (the verdict comes in a
        later message than the training), or start a new one."""
        progress = cls(folder, name)
        if folder is not None:
            with contextlib.suppress(OSError, FormatError):
                progress.state.update(read_progress(progress_path(folder, name)))
        return progress

    def stage(self, stage: str, reason: str = "") -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown progress stage {stage!r}")
        now = time.time()
        self.state.update(stage=stage, stage_started=now, reason=reason[:MAX_REASON_CHARS])
        self.state["stage_times"][stage] = now  # when each stage began: wall time per stage
        self._write(now)

    def step(self, step: int, steps: int, loss: float) -> None:
        """After optimizer step ``step`` (1-based) of ``steps``, with its training loss."""
        losses: list[list[float]] = self.state["losses"]
        losses.append([step, float(loss)])
        if len(losses) > MAX_LOSS_POINTS:  # thin out: every other point, keep the latest
            self.state["losses"] = losses = [*losses[:-1:2], losses[-1]]
        self.state.update(step=step, steps=steps, loss=float(loss))
        now = time.time()
        if now - self._written >= WRITE_INTERVAL_S or step == steps:
            self._write(now)

    def _write(self, now: float) -> None:
        if self.folder is None:
            return
        self.state["updated"] = now
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.state, allow_nan=False, separators=(",", ":")).encode()
        write_atomic(progress_path(self.folder, self.name), data)
        self._written = now


def read_progress(path: Path) -> dict[str, Any]:
    """A progress file, parsed strictly and checked field by field (FormatError otherwise)."""
    # Opened without following links and without blocking, then checked to be a regular
    # file: a FIFO or a link in its place is refused, never waited on or followed.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{path.name} is not a regular file")
        data = os.read(fd, MAX_PROGRESS_BYTES + 1)
    finally:
        os.close(fd)
    state = loads_strict(data, what=path.name, max_bytes=MAX_PROGRESS_BYTES)
    if not isinstance(state, dict) or state.get("format") != PROGRESS_FORMAT:
        raise FormatError(f"{path.name} is not a {PROGRESS_FORMAT} progress file")
    if not isinstance(state.get("client"), str) or not _NAME.match(state["client"]):
        raise FormatError(f"{path.name}: client is not an adapter name")
    if state.get("stage") not in STAGES:
        raise FormatError(f"{path.name}: unknown stage")
    for key in ("step", "steps"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**7:
            raise FormatError(f"{path.name}: {key} must be an integer in [0, 1e7]")
    for key in ("started", "stage_started", "updated"):
        if not _finite(state.get(key)):
            raise FormatError(f"{path.name}: {key} must be a number")
    times = state.get("stage_times")
    if not isinstance(times, dict) or not all(k in STAGES and _finite(v) for k, v in times.items()):
        raise FormatError(f"{path.name}: stage_times must map stages to times")
    if state.get("loss") is not None and not _finite(state["loss"]):
        raise FormatError(f"{path.name}: loss must be a number or null")
    losses = state.get("losses")
    if (
        not isinstance(losses, list)
        or len(losses) > MAX_LOSS_POINTS + 1
        or not all(
            isinstance(p, list) and len(p) == 2 and all(_finite(v) for v in p) for p in losses
        )
    ):
        raise FormatError(f"{path.name}: losses must be a list of [step, loss] pairs")
    if not isinstance(state.get("reason"), str):
        raise FormatError(f"{path.name}: reason must be text")
    state["reason"] = state["reason"][:MAX_REASON_CHARS]
    return state


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) < 1e15
    )
