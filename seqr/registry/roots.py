"""Root metadata: creating, signing and walking the chain of server-key rotations (TUF).

TUF specification 1.0.x, "Detailed client workflow", step 5.3 (update the root role):
a new root N+1 is trusted only if it is signed by a threshold of the keys of the trusted
root N (5.3.4) AND by a threshold of its own keys (5.3.5), and its version is exactly N+1
(5.3.6). Expiry is checked once, on the final root, after the chain is walked (5.3.10),
so a client that was offline for a year can still walk through expired intermediates.
Everything here is pure: bytes in, typed objects out, SignatureError/RegistryError raised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core import signing
from seqr.core.errors import ConfigError, RegistryError, RollbackError
from seqr.registry.envelope import (
    ROOT_TYPE,
    parse_envelope,
    sign_envelope,
    verify_threshold,
)
from seqr.registry.metadata import Root

__all__ = ["make_root", "sign_root", "parse_root", "verify_root_update", "verify_root_chain"]


def make_root(
    version: int,
    public_keys: Sequence[bytes],
    threshold: int,
    issued: datetime,
    expires: datetime,
) -> Root:
    """A root listing ``public_keys`` (each once) with a k-of-n ``threshold``."""
    keys = {signing.fingerprint(k): bytes(k) for k in public_keys}
    if len(keys) != len(public_keys):
        raise ConfigError("root keys: the same public key is listed twice; list each key once")
    if not 1 <= threshold <= len(keys):
        raise ConfigError(f"threshold {threshold} must be between 1 and the {len(keys)} root keys")
    if expires <= issued:
        raise ConfigError(f"root expires {expires} must be after it is issued {issued}")
    return Root(version, issued, expires, keys, threshold)


def sign_root(root: Root, signers: Sequence[EllipticCurvePrivateKey]) -> bytes:
    """The envelope bytes of ``root`` signed by ``signers`` (old and new keys on rotation)."""
    return sign_envelope(ROOT_TYPE, root.to_payload(), signers)


def parse_root(data: bytes, what: str) -> tuple[Root, bytes]:
    """Parse (do not verify) a root envelope; returns the root and the envelope's payload."""
    envelope = parse_envelope(data, ROOT_TYPE, what)
    return Root.from_payload(envelope.payload, what), envelope.payload


def verify_root_update(trusted: Root, data: bytes, what: str) -> Root:
    """Trust root ``trusted.version + 1`` from its envelope bytes (TUF steps 5.3.4-5.3.6)."""
    envelope = parse_envelope(data, ROOT_TYPE, what)
    new = Root.from_payload(envelope.payload, what)
    # 5.3.4: signed by a threshold of the trusted root's keys.
    verify_threshold(
        envelope, trusted.keys, trusted.threshold, f"{what} (by root {trusted.version})"
    )
    # 5.3.5: signed by a threshold of its own keys.
    verify_threshold(envelope, new.keys, new.threshold, f"{what} (by its own keys)")
    # 5.3.6: the version is exactly one more (no skipping, no rollback).
    if new.version != trusted.version + 1:
        raise RegistryError(
            f"{what} has version {new.version}; the root after version {trusted.version} "
            f"must be version {trusted.version + 1}"
        )
    return new


def verify_root_chain(
    root_files: Sequence[bytes],
    *,
    trusted_version: int | None,
    trusted_sha256: str | None,
) -> list[Root]:
    """Walk root files 1..R (``root_files[i]`` is version i+1) from the trusted root.

    With a trusted root (version, SHA-256 of its file), that file must be unchanged and the
    chain is verified from it. On first use, root 1 is trusted if it is signed by a
    threshold of its own keys (trust on first use; pin its hash with AuditConfig). Roots
    before the trusted one are parsed (their keys are needed to check old registry versions)
    but were verified by an earlier audit, as the hash pin proves.
    """
    if not root_files:
        raise RegistryError("registry has no root metadata (root/1.root.json)")
    roots: list[Root] = []
    start = 1 if trusted_version is None else trusted_version
    if start > len(root_files):
        raise RollbackError(
            f"registry offers roots up to version {len(root_files)} but root {start} "
            "is already trusted: the registry was rolled back"
        )
    for i, data in enumerate(root_files[:start], start=1):
        what = f"root/{i}.root.json"
        root, _ = parse_root(data, what)
        if root.version != i:
            raise RegistryError(f"{what} has version {root.version}; expected {i}")
        roots.append(root)
    first = root_files[start - 1]
    if trusted_version is None:
        envelope = parse_envelope(first, ROOT_TYPE, "root/1.root.json")
        verify_threshold(envelope, roots[0].keys, roots[0].threshold, "root/1.root.json")
    elif hashlib.sha256(first).hexdigest() != trusted_sha256:
        raise RegistryError(
            f"root/{start}.root.json is not the root this client trusts (SHA-256 "
            f"{hashlib.sha256(first).hexdigest()[:16]}... != trusted {str(trusted_sha256)[:16]}...)"
        )
    for i in range(start + 1, len(root_files) + 1):
        roots.append(verify_root_update(roots[-1], root_files[i - 1], f"root/{i}.root.json"))
    return roots
