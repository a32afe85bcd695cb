"""Checks on one member's reply in a group round, before Flower's strategy averages it.

A reply joins the average only if its signed contribution record verifies, is by the key that
holds the member's slot, names this group, session, kind and round, says it started from the
global B the server sent and names that B's round digest as its parent (the round chain,
seqr.registry.contribution_records), and states exactly the B in the reply (its digest) and
its example count. B must hold exactly the federation's B tensors (names, shapes, float32,
finite: the ArrayRecord carries B and nothing else), every tensor within the federation's
weight bound, and the update B - B_global within the group's update bound; the example count
may not exceed the group's maximum. The strategy then sees only what was checked
(``averaged_content``), with the FedAvg weight the server computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from seqr.core import signing
from seqr.core.errors import AdmissionError, RegistryError, SeqrError, ValueCheckError
from seqr.core.stats import NormStatistics
from seqr.core.value_bounds import WeightBounds, check_weights
from seqr.registry.contributions import (
    Contribution,
    SignedContribution,
    arrays_sha256,
    verify_contribution,
)

__all__ = [
    "Member",
    "Expected",
    "UpdateBounds",
    "averaged_content",
    "check_update",
    "check_statistics",
    "b_arrays",
]

ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
CONTRIBUTION_RECORD = "contribution"
STATISTICS_RECORD = "statistics"


@dataclass(frozen=True)
class Member:
    """A node that proved it holds the key of a group slot (group_membership.py)."""

    node_id: int
    adapter_name: str
    public_key: bytes

    @property
    def client(self) -> str:
        return signing.fingerprint(self.public_key)


@dataclass(frozen=True)
class Expected:
    """What a reply of this round must state."""

    group: str
    session: str
    round: int
    base_sha256: str  # digest of the global B the server sent
    shapes: Mapping[str, tuple[int, int]]  # B tensor name -> (d_out, r)
    parent_sha256: str = ""  # round_digest of the round that produced that B ("": unchecked)


@dataclass(frozen=True)
class UpdateBounds:
    """What one member's update may be (GroupSettings and the admission policy)."""

    base: Mapping[str, np.ndarray]  # the global B the update started from
    max_update_norm: float  # ||B - base||_F over all tensors (GroupSettings.max_update_norm)
    max_examples: int  # the example count a member may state (group-max-examples)
    weights: WeightBounds  # every tensor of B, as for any adapter (max-tensor-norm)


def b_arrays(record: ArrayRecord, shapes: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The B tensors of an ArrayRecord, checked: exactly the expected names and shapes,
    float32, finite (nothing else may travel: A is never sent)."""
    if set(record.keys()) != set(shapes):
        extra = sorted(set(record.keys()) - set(shapes))[:3]
        missing = sorted(set(shapes) - set(record.keys()))[:3]
        raise AdmissionError(
            "bad_update", f"B tensors differ: unexpected {extra}, missing {missing}"
        )
    out = {}
    for name, array in record.items():
        value = array.numpy()
        if value.dtype != np.float32 or value.shape != shapes[name]:
            raise AdmissionError(
                "bad_update",
                f"{name} is {value.dtype} {value.shape}; expected float32 {shapes[name]}",
            )
        if not np.isfinite(value).all():
            raise AdmissionError("bad_update", f"{name} holds NaN or inf")
        out[name] = value
    return out


def _record(
    content: RecordDict, member: Member, expected: Expected, kind: str
) -> tuple[SignedContribution, Contribution]:
    config = content.config_records.get(CONTRIBUTION_RECORD, ConfigRecord())
    payload, signature = config.get("record"), config.get("signature")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise AdmissionError("unsigned_contribution", "the reply carries no signed record")
    signed = SignedContribution(payload, signature)
    try:
        record = verify_contribution(signed, f"node {member.node_id} {kind}")
    except (RegistryError, SeqrError) as exc:
        raise AdmissionError("bad_signature", str(exc)) from None
    if record.client_key != member.public_key:
        raise AdmissionError(
            "key_mismatch",
            f"the record is signed by {record.client}, but the node declared {member.client}",
        )
    stated = (record.group, record.session, record.kind, record.round, record.base_sha256)
    wanted = (expected.group, expected.session, kind, expected.round, expected.base_sha256)
    if stated != wanted:
        raise AdmissionError(
            "wrong_contribution",
            f"the record states (group, session, kind, round, base) = {stated}; this round is "
            f"{wanted} (replayed or started from another model)",
        )
    if expected.parent_sha256 and record.parent_sha256 != expected.parent_sha256:
        raise AdmissionError(
            "wrong_contribution",
            f"the record names parent round digest {record.parent_sha256[:16]}..., not "
            f"{expected.parent_sha256[:16]}...: a forged round chain",
        )
    return signed, record


def check_update(
    content: RecordDict, member: Member, expected: Expected, bounds: UpdateBounds | None = None
) -> tuple[SignedContribution, dict[str, np.ndarray], int]:
    """A ``train.group`` reply -> (its signed record, its B, its example count);
    AdmissionError names the fault. ``bounds``: the group's bounds (None: format only)."""
    signed, record = _record(content, member, expected, "update")
    if ARRAYS_RECORD not in content.array_records:
        raise AdmissionError("bad_update", "the reply has no ArrayRecord 'arrays'")
    b = b_arrays(content.array_records[ARRAYS_RECORD], expected.shapes)
    if arrays_sha256(b) != record.sha256:
        raise AdmissionError(
            "wrong_contribution", "the B in the reply is not the B the node signed"
        )
    metrics = content.metric_records.get(METRICS_RECORD)
    if metrics is None or metrics.get("num-examples") != record.example_count:
        raise AdmissionError(
            "wrong_contribution", "num-examples differs from the signed example count"
        )
    if bounds is not None:
        _check_bounds(b, record.example_count, bounds)
    return signed, b, record.example_count


def _check_bounds(b: Mapping[str, np.ndarray], examples: int, bounds: UpdateBounds) -> None:
    if examples > bounds.max_examples:
        raise AdmissionError(
            "too_many_examples",
            f"the update states {examples} training examples, over the group's maximum of "
            f"{bounds.max_examples} (group-max-examples): one member may not decide the average",
        )
    try:
        check_weights(b, bounds.weights)
    except ValueCheckError as exc:
        raise AdmissionError("weights_out_of_bounds", str(exc)) from None
    squared = sum(
        float(np.square(b[n].astype(np.float64) - bounds.base[n].astype(np.float64)).sum())
        for n in sorted(b)
    )
    if not squared**0.5 <= bounds.max_update_norm:
        raise AdmissionError(
            "update_too_large",
            f"the update of B has norm {squared**0.5:.4g}, over the bound of "
            f"{bounds.max_update_norm:.4g} (group-max-update-step x train-lr x local steps x "
            "sqrt(entries of B))",
        )


def averaged_content(
    b: Mapping[str, np.ndarray], weight: float, train_loss: object, weight_key: str
) -> RecordDict:
    """What the strategy averages: the checked B, the SERVER's weight for it, and the
    member's loss only when it is a finite number (a metric, never a weight). Nothing else
    a member sent reaches Flower's aggregation (an extra key would even make it skip)."""
    loss = float(train_loss) if isinstance(train_loss, int | float) else float("nan")
    if not np.isfinite(loss) or not 0 <= loss <= 1e6:
        loss = float("nan")
    return RecordDict(
        {
            ARRAYS_RECORD: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in b.items()}),
            METRICS_RECORD: MetricRecord({weight_key: float(weight), "train-loss": loss}),
        }
    )


def check_statistics(
    content: RecordDict, member: Member, expected: Expected
) -> tuple[SignedContribution, bytes, int]:
    """A ``query.group_stats`` reply -> (signed record, statistics bytes, example count)."""
    signed, record = _record(content, member, expected, "statistics")
    stats = content.config_records.get(STATISTICS_RECORD, ConfigRecord()).get("norm-stats")
    if not isinstance(stats, bytes):
        raise AdmissionError("bad_stats", "the reply has no statistics bytes")
    if hashlib.sha256(stats).hexdigest() != record.sha256:
        raise AdmissionError("wrong_contribution", "the statistics are not the ones signed")
    try:
        parsed = NormStatistics.from_json_bytes(stats)
    except SeqrError as exc:
        raise AdmissionError("bad_stats", str(exc)) from None
    if parsed.to_json_bytes() != stats:
        raise AdmissionError("bad_stats", "statistics are not in canonical form")
    return signed, stats, record.example_count
