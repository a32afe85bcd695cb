"""DSSE envelopes with a k-of-n ECDSA P-256 threshold: signatures over exact payload bytes.

Every signed registry file (root, registry version, tree head) is a DSSE v1 envelope
(github.com/secure-systems-lab/dsse, protocol.md)::

    {"payload": base64(payload bytes), "payloadType": TYPE,
     "signatures": [{"keyid": "sha256:...", "sig": base64(64 bytes)}, ...]}

Each signature is ECDSA P-256 (seqr.core.signing) over PAE(TYPE, payload) = "DSSEv1" SP
LEN(TYPE) SP TYPE SP LEN(payload) SP payload, so the signed bytes are exactly the payload the
verifier parses (no canonicalisation) and a root can never be replayed as a registry version
(the type is signed too). Threshold counting follows TUF (spec 1.0.x, "verify signatures"): only
signatures by keys the trusted root lists count, a key counts once however many
signatures it made, and invalid signatures are ignored rather than fatal.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core import signing
from seqr.core.errors import FormatError, SignatureError
from seqr.registry.codec import Fields, dumps, loads

__all__ = [
    "ROOT_TYPE",
    "REGISTRY_TYPE",
    "TREE_HEAD_TYPE",
    "MAX_SIGNATURES",
    "Envelope",
    "ThresholdResult",
    "pae",
    "sign_envelope",
    "parse_envelope",
    "threshold_result",
    "verify_threshold",
]

ROOT_TYPE = "application/vnd.seqr.root.v1+json"
REGISTRY_TYPE = "application/vnd.seqr.registry.v1+json"
TREE_HEAD_TYPE = "application/vnd.seqr.tree-head.v1+json"
MAX_SIGNATURES = 64  # per envelope; more is a denial-of-service attempt, not a threshold


@dataclass(frozen=True)
class Envelope:
    """A parsed (not yet verified) DSSE envelope."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, 64-byte signature)


@dataclass(frozen=True)
class ThresholdResult:
    """Which trusted keys signed (python-tuf ``VerificationResult`` style)."""

    signed: frozenset[str]
    unsigned: frozenset[str]
    threshold: int

    @property
    def verified(self) -> bool:
        return len(self.signed) >= self.threshold


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: the exact bytes each signature covers."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def sign_envelope(
    payload_type: str, payload: bytes, keys: Sequence[EllipticCurvePrivateKey]
) -> bytes:
    """The envelope file bytes: ``payload`` signed by every key in ``keys`` (each once)."""
    message = pae(payload_type, payload)
    seen: set[str] = set()
    sigs = []
    for key in keys:
        keyid = signing.fingerprint(signing.public_key_bytes(key))
        if keyid in seen:
            continue
        seen.add(keyid)
        sigs.append(
            {"keyid": keyid, "sig": base64.b64encode(signing.sign(key, message)).decode("ascii")}
        )
    return dumps(
        {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": payload_type,
            "signatures": sigs,
        }
    )


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64") from None


def parse_envelope(data: bytes, payload_type: str, what: str) -> Envelope:
    """Parse envelope bytes; FormatError unless it is a DSSE envelope of ``payload_type``."""
    fields = Fields(loads(data, what), what, ("payload", "payloadType", "signatures"))
    fields.const("payloadType", payload_type)
    payload = _b64(fields.raw("payload"), f"{what}.payload")
    raw_sigs = fields.array("signatures", max_len=MAX_SIGNATURES)
    sigs = []
    for i, item in enumerate(raw_sigs):
        sig_fields = Fields(item, f"{what}.signatures[{i}]", ("keyid", "sig"))
        keyid = sig_fields.text("keyid", max_len=128)
        sig = _b64(sig_fields.raw("sig"), sig_fields.path("sig"))
        sigs.append((keyid, sig))
    return Envelope(payload_type, payload, tuple(sigs))


def threshold_result(
    envelope: Envelope, keys: Mapping[str, bytes], threshold: int
) -> ThresholdResult:
    """Count the distinct trusted keys (keyid -> raw public key) whose signature verifies."""
    message = pae(envelope.payload_type, envelope.payload)
    signed: set[str] = set()
    for keyid, sig in envelope.signatures:
        public = keys.get(keyid)
        if public is None or keyid in signed:
            continue  # unknown key, or a key that already counted (TUF: each key once)
        try:
            signing.verify(public, message, sig)
        except SignatureError:
            continue  # an invalid signature does not count, and does not poison the rest
        signed.add(keyid)
    return ThresholdResult(frozenset(signed), frozenset(keys.keys() - signed), threshold)


def verify_threshold(
    envelope: Envelope, keys: Mapping[str, bytes], threshold: int, what: str
) -> ThresholdResult:
    """Raise SignatureError unless at least ``threshold`` distinct trusted keys signed."""
    result = threshold_result(envelope, keys, threshold)
    if not result.verified:
        raise SignatureError(
            f"{what} is signed by {len(result.signed)}/{threshold} required trusted keys "
            f"(valid: {sorted(result.signed) or 'none'}; trusted: {sorted(keys)}); "
            "it was altered or signed with keys this registry's root does not list"
        )
    return result
