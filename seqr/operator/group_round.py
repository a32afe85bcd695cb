"""One task-group round without Flower's transport: check the replies, weigh them, advance.

``GroupState`` is everything a group run has decided (the global B, the digest of every
global B, the record digests averaged in each round, the signed records); it is frozen and
only ``advance`` makes a new one, from the updates that passed ``check_round``. A rejected
reply therefore never changes the state: not the B, not the chain, not the weights.

The FedAvg weights are the server's (seqr.core.fedavg_weights: counts clipped, shares
capped), written into each checked reply's content together with its checked B, so Flower's
strategy never reads a number a member chose (group_replies.averaged_content).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from flwr.app import Message

from seqr.core.errors import AdmissionError, ValueCheckError
from seqr.core.fedavg_weights import capped_shares
from seqr.core.printable import printable
from seqr.core.value_bounds import WeightBounds, check_weights
from seqr.operator.group_replies import (
    Expected,
    Member,
    UpdateBounds,
    averaged_content,
    check_update,
)
from seqr.operator.groups import SERVER_WEIGHT_KEY, GroupSettings
from seqr.registry.contributions import (
    SignedContribution,
    arrays_sha256,
    record_digest,
    round_digest,
)

__all__ = [
    "CheckedUpdate",
    "GroupState",
    "RoundCheck",
    "advance",
    "check_round",
    "update_norm",
    "weigh",
]

log = logging.getLogger("seqr.server.groups")


@dataclass(frozen=True)
class GroupState:
    """What a group run has decided after ``round`` rounds (immutable)."""

    round: int
    b: Mapping[str, np.ndarray]  # the global B now (read-only float32 arrays)
    globals: tuple[str, ...]  # arrays_sha256 of the global B after rounds 0..round
    aggregated: tuple[tuple[str, ...], ...]  # record digests averaged in rounds 1..round
    signed: tuple[SignedContribution, ...] = ()

    @classmethod
    def initial(cls, shapes: Mapping[str, tuple[int, int]]) -> GroupState:
        """Round 0: B = 0 (peft's LoRA init), as every member starts."""
        zeros = {name: np.zeros(shape, np.float32) for name, shape in sorted(shapes.items())}
        return cls(0, _frozen(zeros), (arrays_sha256(zeros),), ())

    @property
    def parent(self) -> str:
        """The round digest members of the next round (or the statistics) must sign."""
        return round_digest(self.globals[-1], self.aggregated[-1] if self.aggregated else ())

    @property
    def previous_updates(self) -> tuple[str, ...]:
        """The record digests the current B was averaged from (sent to members)."""
        return self.aggregated[-1] if self.aggregated else ()

    def expected(self, group: str, session: str, shapes: Mapping[str, tuple[int, int]]) -> Expected:
        """What a reply of the next round must state."""
        return Expected(group, session, self.round + 1, self.globals[-1], shapes, self.parent)


@dataclass(frozen=True)
class CheckedUpdate:
    """A reply that passed every check, with what was checked."""

    reply: Message
    node_id: int
    signed: SignedContribution
    b: Mapping[str, np.ndarray]
    examples: int


@dataclass
class RoundCheck:
    """The outcome of checking one round's replies."""

    good: list[CheckedUpdate] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # node id -> "reason: message"
    bytes_up: dict[str, int] = field(default_factory=dict)  # node id -> raw bytes of its B
    update_norms: dict[str, float] = field(default_factory=dict)  # node id -> ||B - base||_F


def check_round(
    replies: Sequence[Message],
    members: Mapping[int, Member],
    expected: Expected,
    bounds: UpdateBounds,
) -> RoundCheck:
    """Every reply of a round checked on its own; one member's bad reply never affects the
    others'. Replies from nodes without a slot are ignored; members without a reply time out."""
    out = RoundCheck()
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in members:
            continue
        if reply.has_error():
            out.rejected[str(node)] = f"client_error: {printable(reply.error.reason, 200)}"
            continue
        try:
            signed, b, examples = check_update(reply.content, members[node], expected, bounds)
        except AdmissionError as exc:
            out.rejected[str(node)] = f"{exc.reason}: {exc}"
            continue
        out.bytes_up[str(node)] = sum(int(v.nbytes) for v in b.values())
        out.update_norms[str(node)] = update_norm(b, bounds.base)
        out.good.append(CheckedUpdate(reply, node, signed, _frozen(b), examples))
    answered = {r.metadata.src_node_id for r in replies}
    out.rejected.update({str(n): "timeout" for n in members if n not in answered})
    for node_id, reason in sorted(out.rejected.items()):
        log.warning("group %s round %d: node %s left out: %s", expected.group, expected.round,
                    node_id, printable(reason, 300))  # fmt: skip
    return out


def update_norm(b: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """||B - base||_F over every tensor, in float64."""
    return float(
        sum(np.square(b[n].astype(np.float64) - base[n].astype(np.float64)).sum() for n in b) ** 0.5
    )


def weigh(good: Sequence[CheckedUpdate], settings: GroupSettings) -> list[float]:
    """The server's FedAvg weights for the checked updates, written into each reply's
    content (which then holds only the checked B and that weight); returns them."""
    if settings.group_dp != "none":
        shares = [1.0] * len(good)  # DP accounting assumes equal weights (Flower 1.42)
    else:
        shares = capped_shares(
            [u.examples for u in good],
            max_examples=settings.group_max_examples,
            max_share=settings.group_max_weight_share,
        )
    for update, share in zip(good, shares, strict=True):
        metrics = update.reply.content.metric_records.get("metrics")
        loss = None if metrics is None else metrics.get("train-loss")
        update.reply.content = averaged_content(update.b, share, loss, SERVER_WEIGHT_KEY)
    return shares


def advance(
    state: GroupState,
    aggregate: Mapping[str, np.ndarray],
    good: Sequence[CheckedUpdate],
    weights: WeightBounds,
) -> GroupState:
    """The state after a round: the aggregated B (within the weight bounds) and the chain
    extended by its digest and the updates averaged into it. ``state`` is unchanged."""
    if not good:
        raise AdmissionError("aggregation_failed", f"round {state.round + 1}: no update to average")
    b = {k: np.asarray(aggregate[k], np.float32) for k in sorted(state.b)}
    try:
        check_weights(b, weights)
    except ValueCheckError as exc:
        raise AdmissionError("weights_out_of_bounds", f"the aggregated B: {exc}") from None
    digests = tuple(sorted(record_digest(u.signed) for u in good))
    return GroupState(
        round=state.round + 1,
        b=_frozen(b),
        globals=(*state.globals, arrays_sha256(b)),
        aggregated=(*state.aggregated, digests),
        signed=(*state.signed, *(u.signed for u in good)),
    )


def _frozen(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    out = {}
    for name, value in arrays.items():
        copy = np.array(value, dtype=np.float32, copy=True)
        copy.flags.writeable = False
        out[name] = copy
    return MappingProxyType(out)
