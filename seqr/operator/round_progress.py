"""Replies as they arrive: the server's log of a round in progress, with a count and an ETA.

Flower's ``grid.send_and_receive`` returns only when every node has replied (or the timeout
passed), which on a slow machine is more than an hour of silence. ``stream_replies`` pushes
the messages and pulls what has arrived every few seconds (the same two Grid calls
send_and_receive makes, flwr/server/grid/grid.py), so the ServerApp checks and logs each
submission the moment it comes in. ``RoundProgress`` is the pure part: counts, times, ETA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from seqr.operator.round import Verdict

log = logging.getLogger("seqr.server")
POLL_S = 2.0  # seconds between pulls of the SuperLink's replies


def stream_replies(
    grid: Grid, messages: Sequence[Message], *, timeout_s: float, poll_s: float = POLL_S
) -> Iterator[Message]:
    """Push ``messages``; yield each reply as it arrives, until all replied or ``timeout_s``.
    Nodes that never reply yield nothing (the caller turns them into timeouts)."""
    pending = {i for i in grid.push_messages(messages) if i}
    deadline = time.monotonic() + timeout_s
    while pending:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class RoundProgress:
    """Counts and ETA of one round's replies (times from ``clock``, seconds)."""

    server_round: int
    expected: int
    started: float = field(default_factory=time.monotonic)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return sum(self.counts.values())

    def eta_s(self, now: float) -> float | None:
        """Seconds until the last reply at the mean rate so far (None before the first)."""
        if self.received == 0:
            return None
        per_reply = (now - self.started) / self.received
        return per_reply * (self.expected - self.received)

    def line(self, verdict: Verdict, now: float | None = None) -> str:
        """Record one verdict; the log line for it."""
        now = time.monotonic() if now is None else now
        self.counts[verdict.status] = self.counts.get(verdict.status, 0) + 1
        outcome = verdict.status if verdict.admitted else f"{verdict.status} ({verdict.reason})"
        detail = verdict.message[:160].replace("\n", " ")
        left = self.expected - self.received
        eta = self.eta_s(now)
        tail = "all replies in" if left <= 0 else f"{left} to come, ETA {_duration(eta or 0)}"
        return (
            f"round {self.server_round}: reply {self.received} of {self.expected} from node "
            f"{verdict.node_id} after {_duration(now - self.started)}: {outcome} - {detail}; "
            f"{tail}"
        )

    def summary(self) -> str:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        return f"round {self.server_round}: {self.received} of {self.expected} replied ({parts})"
