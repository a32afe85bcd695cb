"""Signed contributions to a group adapter, and the file that lists them (no Flower here).

Clients that share a task federate one adapter (FFA-LoRA, Sun et al. ICLR 2024: every adapter
shares the frozen A, so FedAvg of B is exact: mean_i(B_i A) = (mean_i B_i) A). The server signs
the result; this module lets anyone check who produced it. What members sign (contribution
records, membership proofs, the round chain) is defined in contribution_records.py.

The server lists every record in ``contributions.json`` (a sixth file of the group export,
hashed in the server-signed manifest), with the digest of the global B after every round
(``globals``), the record digests it averaged in each round (``aggregated``), the weighting
rule (``max_examples``, ``max_share_ppm``: seqr.core.fedavg_weights) and each client's
partial statistics. ``verify_contributions`` checks: every signature; that every record names
this group and session; that each update started from the global B of the round before (no
split view) and names, as its parent, the round digest of that B and the updates averaged
into it, so the rounds form one hash chain (a forged, re-ordered or rewritten round breaks
it); that each round lists exactly its signed updates; that no update claims more examples
than the rule allows and no member's weight share exceeds the cap; that every statistics
record was computed on exactly the published B; and that the published norm_stats.json is,
byte for byte, the exact merge (Chan et al., seqr.core.stats) of the signed partial
statistics. The group manifest's ``example_count`` is the number of calibration sequences
behind those statistics (the sum the statistics records sign).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from seqr.core.errors import FormatError, RegistryError
from seqr.core.fedavg_weights import capped_shares
from seqr.core.stats import NormStatistics
from seqr.registry.codec import MAX_INT, Fields, check_hex, dumps, loads
from seqr.registry.contribution_records import (
    CONTRIBUTION_TYPE,
    MAX_ROUNDS,
    SHA,
    SPEC_VERSION,
    Contribution,
    MembershipProof,
    SignedContribution,
    adapter_b_sha256,
    arrays_sha256,
    lora_b_name,
    record_digest,
    round_digest,
    sign_contribution,
    sign_membership,
    verify_contribution,
    verify_membership,
)
from seqr.registry.metadata import CONTRIBUTIONS_FILE

__all__ = [
    "CONTRIBUTION_TYPE",
    "CONTRIBUTIONS_FILE",
    "Contribution",
    "MembershipProof",
    "SignedContribution",
    "ContributionsFile",
    "ContributionsReport",
    "lora_b_name",
    "arrays_sha256",
    "adapter_b_sha256",
    "merge_partial_statistics",
    "record_digest",
    "round_digest",
    "sign_contribution",
    "sign_membership",
    "verify_contribution",
    "verify_contributions",
    "verify_membership",
]

MAX_RECORDS = 100_000  # records in one file (clients x rounds); more is endless data
PPM = 1_000_000  # weight shares are written in parts per million (signed JSON has no floats)


def merge_partial_statistics(partials: Mapping[str, bytes]) -> NormStatistics:
    """Exact merge (Chan et al.) of partial statistics, in sorted client-key-id order."""
    if not partials:
        raise FormatError("no partial statistics to merge")
    parsed = [NormStatistics.from_json_bytes(partials[keyid]) for keyid in sorted(partials)]
    merged = NormStatistics()
    for stats in parsed:
        merged = merged.merge(stats)
    records = [s.privacy for s in parsed]
    if any(r is not None for r in records):
        if not all(r is not None for r in records):
            raise FormatError("some partial statistics are differentially private and some not")
        # Each client's noise protects its own disjoint data: parallel composition, so the
        # merge is (max epsilon, max delta)-DP per calibration sequence.
        merged.privacy = {
            "mechanism": str(records[0]["mechanism"]),  # type: ignore[index]
            "epsilon": max(float(r["epsilon"]) for r in records),  # type: ignore[index]
            "delta": max(float(r["delta"]) for r in records),  # type: ignore[index]
            "composition": f"parallel over {len(records)} clients' disjoint data",
        }
    return merged


@dataclass(frozen=True)
class ContributionsFile:
    """contributions.json: written by the server, signed through the group manifest."""

    group: str
    session: str
    rounds: int
    aggregation: str  # e.g. "fedavg weighted by num-examples"
    privacy: str  # "none", or the DP mechanism and the (epsilon, delta) reached, as text
    globals: tuple[str, ...]  # arrays_sha256 of the global B before round 1 .. after round R
    aggregated: tuple[tuple[str, ...], ...]  # per round: record_digest of each update averaged
    max_examples: int  # the weighting rule: counts above are refused
    max_share_ppm: int  # ... and no member's weight share above this (parts per million)
    contributions: tuple[SignedContribution, ...]
    statistics: Mapping[str, bytes]  # client key id -> its partial norm_stats.json bytes

    def round_digest(self, r: int) -> str:
        """round_digest of round ``r`` (0: the initial B, averaged from nothing)."""
        return round_digest(self.globals[r], self.aggregated[r - 1] if r else ())

    def to_bytes(self) -> bytes:
        return dumps(
            {
                "_type": "group-contributions",
                "spec_version": SPEC_VERSION,
                "group": self.group,
                "session": self.session,
                "rounds": self.rounds,
                "aggregation": self.aggregation,
                "privacy": self.privacy,
                "globals": list(self.globals),
                "aggregated": [sorted(r) for r in self.aggregated],
                "max_examples": self.max_examples,
                "max_share_ppm": self.max_share_ppm,
                "contributions": [c.to_json() for c in self.contributions],
                "statistics": {k: v.decode("ascii") for k, v in sorted(self.statistics.items())},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, what: str = CONTRIBUTIONS_FILE) -> ContributionsFile:
        keys = ("_type", "spec_version", "group", "session", "rounds", "aggregation", "privacy",
                "globals", "aggregated", "max_examples", "max_share_ppm", "contributions",
                "statistics")  # fmt: skip
        f = Fields(loads(data, what), what, keys)
        f.const("_type", "group-contributions")
        f.const("spec_version", SPEC_VERSION)
        rounds = f.integer("rounds", low=1, high=MAX_ROUNDS)
        raw_globals = f.array("globals", max_len=MAX_ROUNDS + 1)
        globals_ = tuple(
            check_hex(g, SHA, f"{what}.globals[{i}]") for i, g in enumerate(raw_globals)
        )
        aggregated = []
        for r, listed in enumerate(f.array("aggregated", max_len=MAX_ROUNDS), 1):
            if not isinstance(listed, list) or len(listed) > MAX_RECORDS:
                raise FormatError(f"{what}.aggregated[{r - 1}] must be a list of digests")
            aggregated.append(
                tuple(check_hex(d, SHA, f"{what}.aggregated[{r - 1}]") for d in listed)
            )
        items = f.array("contributions", max_len=MAX_RECORDS)
        statistics = {}
        for keyid, text in f.mapping("statistics").items():
            if not isinstance(text, str) or not text.isascii():
                raise FormatError(f"{what}.statistics[{keyid}] must be ASCII JSON text")
            statistics[keyid] = text.encode("ascii")
        return cls(
            group=f.text("group", max_len=128),
            session=f.hex("session", 16),
            rounds=rounds,
            aggregation=f.text("aggregation", max_len=256),
            privacy=f.text("privacy", max_len=1024),
            globals=globals_,
            aggregated=tuple(aggregated),
            max_examples=f.integer("max_examples", low=1, high=MAX_INT),
            max_share_ppm=f.integer("max_share_ppm", low=1, high=PPM),
            contributions=tuple(
                SignedContribution.from_json(c, f"{what}.contributions[{i}]")
                for i, c in enumerate(items)
            ),
            statistics=statistics,
        )


@dataclass(frozen=True)
class ContributionsReport:
    """What an auditor learns from a verified contributions.json."""

    group: str
    rounds: int
    contributors: tuple[str, ...]  # client key ids, sorted
    records: tuple[Contribution, ...]

    def examples_by_client(self) -> dict[str, int]:
        """Client key id -> the training examples (chunks) its update records state: the
        FedAvg weight it claimed (the largest over its rounds)."""
        out: dict[str, int] = {}
        for r in self.records:
            if r.kind == "update":
                out[r.client] = max(out.get(r.client, 0), r.example_count)
        return out


def verify_contributions(
    data: bytes,
    *,
    group: str,
    adapter_weights: bytes,
    stats_bytes: bytes,
    example_count: int,
) -> ContributionsReport:
    """Every check of the module docstring; RegistryError or FormatError names the first
    failure. ``group`` is the name in the server-signed manifest, ``example_count`` its count."""
    doc = ContributionsFile.from_bytes(data)
    if doc.group != group:
        raise RegistryError(f"{CONTRIBUTIONS_FILE} is for group {doc.group!r}, not {group!r}")
    if len(doc.globals) != doc.rounds + 1 or len(doc.aggregated) != doc.rounds:
        raise RegistryError(
            f"{CONTRIBUTIONS_FILE} lists {len(doc.globals)} global models and "
            f"{len(doc.aggregated)} aggregates for {doc.rounds} round(s); expected "
            f"{doc.rounds + 1} and {doc.rounds}"
        )
    final = adapter_b_sha256(adapter_weights)
    if doc.globals[-1] != final:
        raise RegistryError(
            f"the published B has digest {final[:16]}... but the last global model of the group "
            f"run is {doc.globals[-1][:16]}...: not the adapter the clients trained"
        )
    records = _verified_records(doc)
    _check_rounds(doc, records)
    stats_records = {r.client: r for _, r in records if r.kind == "statistics"}
    if set(stats_records) != set(doc.statistics):
        raise RegistryError(
            f"partial statistics are listed for {sorted(doc.statistics)} but signed by "
            f"{sorted(stats_records)}"
        )
    if not stats_records:
        raise RegistryError("no client signed partial statistics: norm_stats.json is unsupported")
    for keyid, record in stats_records.items():
        digest = hashlib.sha256(doc.statistics[keyid]).hexdigest()
        if digest != record.sha256:
            raise RegistryError(
                f"the partial statistics of client {keyid} have SHA-256 {digest[:16]}... but "
                f"the client signed {record.sha256[:16]}...: they were changed"
            )
    merged = merge_partial_statistics(doc.statistics).to_json_bytes()
    if merged != stats_bytes:
        raise RegistryError(
            "norm_stats.json is not the exact merge of the signed partial statistics"
        )
    total = sum(r.example_count for r in stats_records.values())
    if total != example_count:
        raise RegistryError(
            f"the manifest states {example_count} examples but the signed statistics records "
            f"add up to {total}"
        )
    contributors = tuple(sorted({r.client for _, r in records}))
    return ContributionsReport(doc.group, doc.rounds, contributors, tuple(r for _, r in records))


def _check_rounds(doc: ContributionsFile, records: list[tuple[str, Contribution]]) -> None:
    """Each round lists exactly its signed updates, none over the example bound, and their
    weight shares under the rule keep every member at or below the cap."""
    for r in range(1, doc.rounds + 1):
        updates = {d: rec for d, rec in records if rec.kind == "update" and rec.round == r}
        if not updates:
            raise RegistryError(f"round {r} has no signed update: the chain is incomplete")
        listed = doc.aggregated[r - 1]
        if len(set(listed)) != len(listed) or set(listed) != set(updates):
            raise RegistryError(
                f"round {r} lists {len(listed)} averaged update(s) but {len(updates)} signed "
                "update(s) of that round: the round's global B is not tied to its updates"
            )
        counts = [rec.example_count for rec in updates.values()]
        if max(counts) > doc.max_examples:
            raise RegistryError(
                f"round {r}: an update claims {max(counts)} examples, over the group's "
                f"maximum of {doc.max_examples}"
            )
        cap = doc.max_share_ppm / PPM
        shares = capped_shares(counts, max_examples=doc.max_examples, max_share=cap)
        if max(shares) > max(cap, 1 / len(shares)) + 1e-12:  # the rule itself, re-checked
            raise RegistryError(f"round {r}: one member's weight share is {max(shares):.3f}")


def _verified_records(doc: ContributionsFile) -> list[tuple[str, Contribution]]:
    """(record digest, record) of every record, signature and chain links checked."""
    seen: set[tuple[str, str, int]] = set()
    out = []
    for i, signed in enumerate(doc.contributions):
        what = f"{CONTRIBUTIONS_FILE} contribution {i}"
        record = verify_contribution(signed, what)
        if (record.group, record.session) != (doc.group, doc.session):
            raise RegistryError(
                f"{what} is for group {record.group!r} session {record.session[:8]}..., not "
                f"{doc.group!r} session {doc.session[:8]}... (replayed from another run)"
            )
        key = (record.client, record.kind, record.round)
        if key in seen:
            raise RegistryError(
                f"{what} repeats client {record.client}'s {record.kind} of round {record.round}"
            )
        seen.add(key)
        previous = _previous_round(doc, record, what)
        if record.base_sha256 != doc.globals[previous]:
            raise RegistryError(
                f"{what}: client {record.client} started from B {record.base_sha256[:16]}... "
                f"but the global model then was {doc.globals[previous][:16]}... (split view)"
            )
        if record.parent_sha256 != doc.round_digest(previous):
            raise RegistryError(
                f"{what}: client {record.client} signed round {previous} as "
                f"{record.parent_sha256[:16]}... but the file's round {previous} (its global B "
                "and the updates averaged into it) digests otherwise: a forged round chain"
            )
        out.append((record_digest(signed), record))
    return out


def _previous_round(doc: ContributionsFile, record: Contribution, what: str) -> int:
    """The round whose global B the record started from."""
    if record.kind == "update":
        if record.round > doc.rounds:
            raise RegistryError(f"{what} is for round {record.round} of {doc.rounds}")
        return record.round - 1
    if record.round != doc.rounds:
        raise RegistryError(f"{what}: statistics must be of the final round {doc.rounds}")
    return doc.rounds
