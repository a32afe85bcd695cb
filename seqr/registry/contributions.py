"""Signed contributions to a group adapter, and the file that lists them (no Flower here).

Clients that share a task federate one adapter (FFA-LoRA, Sun et al. ICLR 2024: every adapter
shares the frozen A, so FedAvg of B is exact: mean_i(B_i A) = (mean_i B_i) A). The server signs
the result; this module lets anyone check who produced it.

Each client signs, with its adapter key, one **contribution record** per message it answers:
``update`` (round r: the B it sent back, trained from the global B of round r - 1) and
``statistics`` (its partial norm statistics of the final group adapter, on its own data). A
record is deterministic registry JSON (integers and strings only, codec.dumps) and the
signature is ECDSA P-256 (seqr.core.signing) over DSSE's PAE(CONTRIBUTION_TYPE, record)
(envelope.pae), so a record can never be replayed as a manifest or a registry file.
``session`` is the server's random nonce for one group run: records of another run do not
verify here.

The server lists every record in ``contributions.json`` (a sixth file of the group export,
hashed in the server-signed manifest), with the digest of the global B after every round
(``globals``) and each client's partial statistics. ``verify_contributions`` checks:
every signature; that every record names this group and session; that each update started
from the global B of the round before (all clients saw one chain of models: no split view);
that every statistics record was computed on exactly the published B (the digest of the B
tensors in adapter_model.safetensors); and that the published norm_stats.json is, byte for
byte, the exact merge (Chan et al., seqr.core.stats) of the signed partial statistics. The
group manifest's ``example_count`` is the number of calibration sequences behind those
statistics (the sum the statistics records sign); each update record signs the client's
training examples (its FedAvg weight).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core import signing
from seqr.core.errors import FormatError, KeyFileError, RegistryError, SignatureError
from seqr.core.safetensors_check import load_float_tensors, parse_safetensors_header
from seqr.core.stats import NormStatistics
from seqr.registry.codec import Fields, check_hex, dumps, loads
from seqr.registry.envelope import pae
from seqr.registry.metadata import CONTRIBUTIONS_FILE

__all__ = [
    "CONTRIBUTION_TYPE",
    "CONTRIBUTIONS_FILE",
    "Contribution",
    "SignedContribution",
    "ContributionsFile",
    "ContributionsReport",
    "lora_b_name",
    "arrays_sha256",
    "adapter_b_sha256",
    "merge_partial_statistics",
    "sign_contribution",
    "verify_contribution",
    "verify_contributions",
]

CONTRIBUTION_TYPE = "application/vnd.seqr.contribution.v1+json"
SPEC_VERSION = "1"
MAX_RECORDS = 100_000  # records in one file (clients x rounds); more is endless data
MAX_ROUNDS = 10_000
_SHA = 32
Kind = Literal["update", "statistics"]


def lora_b_name(module: str) -> str:
    """peft's saved name of a module's B (seqr.operator.federation_setup.peft_tensor_name)."""
    return f"base_model.model.{module}.lora_B.weight"


def arrays_sha256(arrays: Mapping[str, Any]) -> str:
    """Digest of named float32 tensors: sorted names, each with its shape and raw bytes.

    Client and server compute it from what travels (ArrayRecord -> numpy), the auditor from
    the B tensors of adapter_model.safetensors; all three agree bit for bit.
    """
    h = hashlib.sha256(b"seqr-arrays-v1\0")
    for name in sorted(arrays):
        value = np.ascontiguousarray(np.asarray(arrays[name]), dtype="<f4")
        h.update(name.encode("utf-8") + b"\0" + repr(tuple(value.shape)).encode() + b"\0")
        h.update(value.tobytes())
    return h.hexdigest()


def adapter_b_sha256(weights: bytes) -> str:
    """``arrays_sha256`` of the lora_B tensors of adapter_model.safetensors bytes."""
    tensors = load_float_tensors(weights, parse_safetensors_header(weights))
    b = {name: t for name, t in tensors.items() if name.endswith(".lora_B.weight")}
    if not b:
        raise FormatError("adapter_model.safetensors holds no lora_B tensor")
    return arrays_sha256(b)


@dataclass(frozen=True)
class Contribution:
    """What one client states about one message it answered in a group run."""

    group: str
    session: str  # 32 hex: the server's nonce for this group run
    kind: Kind
    round: int  # update: 1..rounds; statistics: rounds
    client_key: bytes  # DER public key (seqr.core.signing)
    example_count: int  # training chunks (update) or calibration sequences (statistics)
    sha256: str  # arrays_sha256 of the B sent (update) / sha256 of the statistics bytes
    base_sha256: str  # arrays_sha256 of the global B received

    @property
    def client(self) -> str:
        return signing.fingerprint(self.client_key)

    def to_payload(self) -> bytes:
        return dumps(
            {
                "_type": "contribution",
                "spec_version": SPEC_VERSION,
                "group": self.group,
                "session": self.session,
                "kind": self.kind,
                "round": self.round,
                "client_key": self.client_key.hex(),
                "example_count": self.example_count,
                "sha256": self.sha256,
                "base_sha256": self.base_sha256,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, what: str) -> Contribution:
        keys = ("_type", "spec_version", "group", "session", "kind", "round", "client_key",
                "example_count", "sha256", "base_sha256")  # fmt: skip
        f = Fields(loads(payload, what), what, keys)
        f.const("_type", "contribution")
        f.const("spec_version", SPEC_VERSION)
        kind = f.text("kind", max_len=16)
        if kind not in ("update", "statistics"):
            raise FormatError(f"{what}.kind must be 'update' or 'statistics', got {kind!r}")
        return cls(
            group=f.text("group", max_len=128),
            session=f.hex("session", 16),
            kind=kind,  # type: ignore[arg-type]
            round=f.integer("round", low=1, high=MAX_ROUNDS),
            client_key=_client_key(f.raw("client_key"), f.path("client_key")),
            example_count=f.integer("example_count", low=1),
            sha256=f.hex("sha256", _SHA),
            base_sha256=f.hex("base_sha256", _SHA),
        )


def _client_key(value: object, what: str) -> bytes:
    try:
        return signing.parse_public_key(check_hex(value, signing.PUBLIC_KEY_BYTES, what))
    except KeyFileError as exc:
        raise FormatError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class SignedContribution:
    """A record's exact bytes and its client's 64-byte signature."""

    payload: bytes
    signature: bytes

    def to_json(self) -> dict[str, str]:
        return {"record": self.payload.decode("ascii"), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, value: object, what: str) -> SignedContribution:
        f = Fields(value, what, ("record", "signature"))
        record = f.text("record", max_len=4096)
        if not record.isascii():
            raise FormatError(f"{what}.record must be ASCII registry JSON")
        signature = bytes.fromhex(f.hex("signature", signing.SIGNATURE_BYTES))
        return cls(record.encode("ascii"), signature)


def sign_contribution(record: Contribution, key: EllipticCurvePrivateKey) -> SignedContribution:
    """Sign a record with the client's adapter key (verified before it is returned)."""
    if signing.public_key_bytes(key) != record.client_key:
        raise SignatureError("the record names another client key than the signing key")
    payload = record.to_payload()
    signed = SignedContribution(payload, signing.sign(key, pae(CONTRIBUTION_TYPE, payload)))
    verify_contribution(signed, "new contribution")  # verify before use
    return signed


def verify_contribution(signed: SignedContribution, what: str) -> Contribution:
    """Parse the record and check its signature by the key it names (RegistryError if not)."""
    record = Contribution.from_payload(signed.payload, what)
    try:
        signing.verify(record.client_key, pae(CONTRIBUTION_TYPE, signed.payload), signed.signature)
    except SignatureError:
        raise RegistryError(
            f"{what}: the signature of client {record.client} does not verify over the record "
            "(forged or altered contribution)"
        ) from None
    return record


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
    contributions: tuple[SignedContribution, ...]
    statistics: Mapping[str, bytes]  # client key id -> its partial norm_stats.json bytes

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
                "contributions": [c.to_json() for c in self.contributions],
                "statistics": {k: v.decode("ascii") for k, v in sorted(self.statistics.items())},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, what: str = CONTRIBUTIONS_FILE) -> ContributionsFile:
        keys = ("_type", "spec_version", "group", "session", "rounds", "aggregation", "privacy",
                "globals", "contributions", "statistics")  # fmt: skip
        f = Fields(loads(data, what), what, keys)
        f.const("_type", "group-contributions")
        f.const("spec_version", SPEC_VERSION)
        rounds = f.integer("rounds", low=1, high=MAX_ROUNDS)
        raw_globals = f.array("globals", max_len=MAX_ROUNDS + 1)
        globals_ = tuple(
            check_hex(g, _SHA, f"{what}.globals[{i}]") for i, g in enumerate(raw_globals)
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
    if len(doc.globals) != doc.rounds + 1:
        raise RegistryError(
            f"{CONTRIBUTIONS_FILE} lists {len(doc.globals)} global models for {doc.rounds} "
            f"round(s); expected {doc.rounds + 1}"
        )
    final = adapter_b_sha256(adapter_weights)
    if doc.globals[-1] != final:
        raise RegistryError(
            f"the published B has digest {final[:16]}... but the last global model of the group "
            f"run is {doc.globals[-1][:16]}...: not the adapter the clients trained"
        )
    records = _verified_records(doc)
    updates = {r.round for r in records if r.kind == "update"}
    missing = sorted(set(range(1, doc.rounds + 1)) - updates)
    if missing:
        raise RegistryError(f"round(s) {missing} have no signed update: the chain is incomplete")
    stats_records = {r.client: r for r in records if r.kind == "statistics"}
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
    contributors = tuple(sorted({r.client for r in records}))
    return ContributionsReport(doc.group, doc.rounds, contributors, records)


def _verified_records(doc: ContributionsFile) -> tuple[Contribution, ...]:
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
        expected_base = _expected_base(doc, record, what)
        if record.base_sha256 != expected_base:
            raise RegistryError(
                f"{what}: client {record.client} started from B {record.base_sha256[:16]}... "
                f"but the global model then was {expected_base[:16]}... (split view)"
            )
        out.append(record)
    return tuple(out)


def _expected_base(doc: ContributionsFile, record: Contribution, what: str) -> str:
    if record.kind == "update":
        if record.round > doc.rounds:
            raise RegistryError(f"{what} is for round {record.round} of {doc.rounds}")
        return doc.globals[record.round - 1]
    if record.round != doc.rounds:
        raise RegistryError(f"{what}: statistics must be of the final round {doc.rounds}")
    return doc.globals[doc.rounds]
