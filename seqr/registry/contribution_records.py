"""What group members sign: contribution records, membership proofs and the round chain.

Clients that share a task federate one adapter (seqr.registry.contributions). Each member
signs, with its enrolled adapter key, every message it answers:

- a **membership proof** when the server asks who it is: the server's fresh random challenge,
  the adapter name it uses and its public key. A task-groups slot names a key fingerprint, so
  a slot goes only to a node that proves it holds that key: nobody can take an offline
  member's slot or knock an online one out by claiming its name (docs/THREATS.md, "bind
  membership to keys").
- a **contribution record** per round (``update``: the B it sent back) and at the end
  (``statistics``: its partial norm statistics of the final adapter). Besides the digest of
  the global B it received (``base_sha256``), each record carries ``parent_sha256``, the
  **round digest** of what that global B was made of, which the member computes itself:
  round_digest(r) = H(global B after round r, the record digests averaged in round r), with
  round 0 the initial B and no records. Every record of round r + 1 (and every statistics
  record, for the last round) thus signs which updates produced the B it started from, and
  the rounds form a hash chain that nobody can re-order, extend or rewrite afterwards.

Records are deterministic registry JSON (integers and strings only, codec.dumps) signed over
DSSE's PAE(type, payload) (envelope.pae), one type per kind of statement, so none can be
replayed as another (or as a manifest or a registry file). They are parsed with the one
strict JSON parser (seqr.core.strict_json) with floats refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core import signing
from seqr.core.errors import FormatError, KeyFileError, RegistryError, SignatureError
from seqr.core.safetensors_check import load_float_tensors, parse_safetensors_header
from seqr.core.strict_json import loads_strict
from seqr.registry.codec import MAX_INT, Fields, check_hex, dumps
from seqr.registry.envelope import pae

__all__ = [
    "CONTRIBUTION_TYPE",
    "MEMBERSHIP_TYPE",
    "SPEC_VERSION",
    "Contribution",
    "MembershipProof",
    "SignedContribution",
    "adapter_b_sha256",
    "arrays_sha256",
    "lora_b_name",
    "record_digest",
    "round_digest",
    "sign_contribution",
    "sign_membership",
    "verify_contribution",
    "verify_membership",
]

CONTRIBUTION_TYPE = "application/vnd.seqr.contribution.v2+json"
MEMBERSHIP_TYPE = "application/vnd.seqr.group-membership.v1+json"
SPEC_VERSION = "2"
MAX_ROUNDS = 10_000
MAX_RECORD_BYTES = 4096  # one signed record; a few hundred bytes in practice
SHA = 32  # bytes of a SHA-256 digest
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


def round_digest(global_sha256: str, updates: Sequence[str]) -> str:
    """The digest a member signs as ``parent_sha256``: the global B after a round and the
    (sorted) digests of the update records averaged into it (none for round 0)."""
    check_hex(global_sha256, SHA, "global B digest")
    for digest in updates:
        check_hex(digest, SHA, "update record digest")
    text = global_sha256 + "\0" + ",".join(sorted(updates))
    return hashlib.sha256(b"seqr-round-v1\0" + text.encode("ascii")).hexdigest()


def _loads(payload: bytes, what: str) -> Any:
    return loads_strict(payload, what=what, max_bytes=MAX_RECORD_BYTES, floats=False)


def _client_key(value: object, what: str) -> bytes:
    try:
        return signing.parse_public_key(check_hex(value, signing.PUBLIC_KEY_BYTES, what))
    except KeyFileError as exc:
        raise FormatError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Contribution:
    """What one member states about one message it answered in a group run."""

    group: str
    session: str  # 32 hex: the server's nonce for this group run
    kind: Kind
    round: int  # update: 1..rounds; statistics: rounds
    client_key: bytes  # the member's public key
    example_count: int  # training chunks (update) or calibration sequences (statistics)
    sha256: str  # arrays_sha256 of the B sent (update) / sha256 of the statistics bytes
    base_sha256: str  # arrays_sha256 of the global B received
    parent_sha256: str  # round_digest of the round that produced that global B

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
                "parent_sha256": self.parent_sha256,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, what: str) -> Contribution:
        keys = ("_type", "spec_version", "group", "session", "kind", "round", "client_key",
                "example_count", "sha256", "base_sha256", "parent_sha256")  # fmt: skip
        f = Fields(_loads(payload, what), what, keys)
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
            example_count=f.integer("example_count", low=1, high=MAX_INT),
            sha256=f.hex("sha256", SHA),
            base_sha256=f.hex("base_sha256", SHA),
            parent_sha256=f.hex("parent_sha256", SHA),
        )


@dataclass(frozen=True)
class SignedContribution:
    """A record's exact bytes and its signer's signature."""

    payload: bytes
    signature: bytes

    def to_json(self) -> dict[str, str]:
        return {"record": self.payload.decode("ascii"), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, value: object, what: str) -> SignedContribution:
        f = Fields(value, what, ("record", "signature"))
        record = f.text("record", max_len=MAX_RECORD_BYTES)
        if not record.isascii():
            raise FormatError(f"{what}.record must be ASCII registry JSON")
        signature = bytes.fromhex(f.hex("signature", signing.SIGNATURE_BYTES))
        return cls(record.encode("ascii"), signature)


def record_digest(signed: SignedContribution) -> str:
    """SHA-256 of a record's exact signed bytes: how rounds list the updates they averaged."""
    return hashlib.sha256(signed.payload).hexdigest()


def _sign(payload_type: str, payload: bytes, key: EllipticCurvePrivateKey) -> SignedContribution:
    return SignedContribution(payload, signing.sign(key, pae(payload_type, payload)))


def _verify(payload_type: str, signed: SignedContribution, public: bytes, who: str, what: str):
    try:
        signing.verify(public, pae(payload_type, signed.payload), signed.signature)
    except SignatureError:
        raise RegistryError(
            f"{what}: the signature of client {who} does not verify over the record "
            "(forged or altered contribution)"
        ) from None


def sign_contribution(record: Contribution, key: EllipticCurvePrivateKey) -> SignedContribution:
    """Sign a record with the member's adapter key (verified before it is returned)."""
    if signing.public_key_bytes(key) != record.client_key:
        raise SignatureError("the record names another client key than the signing key")
    signed = _sign(CONTRIBUTION_TYPE, record.to_payload(), key)
    verify_contribution(signed, "new contribution")  # verify before use
    return signed


def verify_contribution(signed: SignedContribution, what: str) -> Contribution:
    """Parse the record and check its signature by the key it names (RegistryError if not)."""
    record = Contribution.from_payload(signed.payload, what)
    _verify(CONTRIBUTION_TYPE, signed, record.client_key, record.client, what)
    return record


@dataclass(frozen=True)
class MembershipProof:
    """A node's answer to the server's challenge: the key it holds and the name it uses."""

    challenge: str  # 32 hex: the server's fresh random nonce for this membership query
    node_id: int  # the Flower node answering: a proof copied to another node is refused
    adapter_name: str
    client_key: bytes

    @property
    def client(self) -> str:
        return signing.fingerprint(self.client_key)

    def to_payload(self) -> bytes:
        return dumps(
            {
                "_type": "group-membership",
                "spec_version": SPEC_VERSION,
                "challenge": self.challenge,
                "node_id": self.node_id,
                "adapter_name": self.adapter_name,
                "client_key": self.client_key.hex(),
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, what: str) -> MembershipProof:
        keys = ("_type", "spec_version", "challenge", "node_id", "adapter_name", "client_key")
        f = Fields(_loads(payload, what), what, keys)
        f.const("_type", "group-membership")
        f.const("spec_version", SPEC_VERSION)
        return cls(
            challenge=f.hex("challenge", 16),
            node_id=f.integer("node_id", low=0, high=2**64 - 1),
            adapter_name=f.text("adapter_name", max_len=128),
            client_key=_client_key(f.raw("client_key"), f.path("client_key")),
        )


def sign_membership(
    challenge: str, node_id: int, adapter_name: str, key: EllipticCurvePrivateKey
) -> SignedContribution:
    """The member's proof that it holds ``key`` now (for this challenge and node only)."""
    proof = MembershipProof(challenge, node_id, adapter_name, signing.public_key_bytes(key))
    signed = _sign(MEMBERSHIP_TYPE, proof.to_payload(), key)
    verify_membership(signed, challenge, node_id, "new membership proof")  # verify before use
    return signed


def verify_membership(
    signed: SignedContribution, challenge: str, node_id: int, what: str
) -> MembershipProof:
    """The proof, checked: it answers ``challenge`` for ``node_id`` (the node the reply came
    from) and is signed by the key it names."""
    proof = MembershipProof.from_payload(signed.payload, what)
    if proof.challenge != challenge:
        raise RegistryError(
            f"{what} answers challenge {proof.challenge[:8]}..., not this query's "
            f"{challenge[:8]}... (replayed)"
        )
    if proof.node_id != node_id:
        raise RegistryError(f"{what} was made by node {proof.node_id}, not node {node_id} (copied)")
    _verify(MEMBERSHIP_TYPE, signed, proof.client_key, proof.client, what)
    return proof
