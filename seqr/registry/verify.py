"""The audit's verification core: bytes of roots, versions and tree head in, typed result out.

No file or network access (python-tuf TrustedMetadataSet style): audit.py reads the bytes
with size caps and calls ``verify_metadata``, which raises on the first failure:

1. Rollback: the offered version is not older than the trusted one.
2. Root chain (roots.py, TUF 5.3): every rotation signed by old AND new thresholds.
3. History: every version newer than the trusted one is signed by a threshold of the root it
   names (root versions never decrease), holds its own version number (mix-and-match), chains
   to the previous file by SHA-256, keeps every earlier adapter unless its client was
   revoked, keeps every revocation, and lists only allow-listed, unrevoked clients.
4. Freeze: the newest version and the newest root have not expired at ``now`` (checked after
   the chain is walked, TUF 5.3.10 / 5.4.3).
5. Log (RFC 9162): the tree head is signed by the newest root's threshold, its size is the
   number of versions, its root is the Merkle root of ALL version files (so every version's
   leaf is included), its own inclusion and consistency proofs verify, and a consistency
   proof from the trusted tree head verifies (fork / split view).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from seqr.core.errors import ForkError, FreezeError, RegistryError, RollbackError
from seqr.registry import merkle
from seqr.registry.codec import format_time
from seqr.registry.entries import check_listing
from seqr.registry.envelope import (
    REGISTRY_TYPE,
    Envelope,
    parse_envelope,
    verify_threshold,
)
from seqr.registry.metadata import Entry, RegistryMetadata, Root, parse_pointer
from seqr.registry.roots import verify_root_chain
from seqr.registry.tree_head import TreeHead, verify_tree_head
from seqr.registry.trusted_state import TrustedState

__all__ = [
    "RegistryFiles",
    "VerifiedRegistry",
    "peek_root_version",
    "verify_version",
    "verify_metadata",
]


@dataclass(frozen=True)
class RegistryFiles:
    """The exact bytes an audit needs, as read from a registry folder."""

    pointer: bytes  # latest.json
    roots: Sequence[bytes]  # root/1..R.root.json, R = root_version of the newest version
    metadata: Sequence[bytes]  # metadata/1..N.registry.json, N from latest.json
    tree_head: bytes  # log/N.tree_head.json


@dataclass(frozen=True)
class VerifiedRegistry:
    metadata: RegistryMetadata  # the newest version, fully verified
    root: Root  # the newest root
    tree_head: TreeHead
    signed_by: frozenset[str]  # server key ids whose signatures on the newest version count
    state: TrustedState  # what to remember once the adapter files pass too
    first_use: bool


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload(
    data: bytes, what: str, cache: dict[str, Entry] | None = None
) -> tuple[RegistryMetadata, Envelope]:
    envelope = parse_envelope(data, REGISTRY_TYPE, what)
    return RegistryMetadata.from_payload(envelope.payload, what, cache), envelope


def peek_root_version(metadata_bytes: bytes) -> int:
    """The root version a registry version names (UNVERIFIED: tells the reader how many
    root files to read; verify_metadata checks everything afterwards)."""
    meta, _ = _payload(metadata_bytes, "newest registry metadata")
    return meta.root_version


def verify_version(
    version: int,
    data: bytes,
    previous_data: bytes | None,
    previous: RegistryMetadata | None,
    roots: Sequence[Root],
    entry_cache: dict[str, Entry] | None = None,
) -> tuple[RegistryMetadata, frozenset[str]]:
    """Verify registry version ``version`` against the (already verified) version before it."""
    what = f"metadata/{version}.registry.json"
    meta, envelope = _payload(data, what, entry_cache)
    if meta.version != version:
        # A file renamed or copied from another version: mix-and-match (TUF snapshot role).
        raise RegistryError(f"{what} holds version {meta.version}, not {version} (mix-and-match)")
    low = previous.root_version if previous is not None else 1
    if not low <= meta.root_version <= len(roots):
        raise RegistryError(
            f"{what} names root version {meta.root_version}; it must be between {low} (the "
            f"previous version's) and {len(roots)} (the newest root)"
        )
    root = roots[meta.root_version - 1]
    result = verify_threshold(envelope, root.keys, root.threshold, what)
    expected_previous = None if previous_data is None else (version - 1, _sha(previous_data))
    if meta.previous != expected_previous:
        raise RegistryError(
            f"{what} says the previous version is {meta.previous}, but the stored chain gives "
            f"{expected_previous}: versions were mixed or rewritten"
        )
    if previous is not None:
        if meta.issued < previous.issued:
            raise RegistryError(
                f"{what} was issued {format_time(meta.issued)}, before version "
                f"{previous.version} ({format_time(previous.issued)})"
            )
        dropped = previous.revoked.keys() - meta.revoked.keys()
        if dropped:
            raise RegistryError(
                f"{what} drops the revocation of client key(s) {sorted(dropped)}; "
                "revocations are permanent"
            )
        current = {e.adapter_sha256: e for e in meta.entries}
        for old in previous.entries:
            if any(k in meta.revoked for k in (old.client, *(old.contributors or ()))):
                continue  # its adapters leave the registry with the revocation
            if current.get(old.adapter_sha256) != old:
                raise RegistryError(
                    f"{what} removes or changes adapter {old.adapter_sha256[:16]} of version "
                    f"{previous.version} without revoking its client: the registry is append-only"
                )
    check_listing(meta, what)
    known = set() if previous is None else {e.adapter_sha256 for e in previous.entries}
    check_group_signers(meta, root, known, what)
    return meta, result.signed


def check_group_signers(meta: RegistryMetadata, root: Root, known: set[str], what: str) -> None:
    """A group adapter new in this version is signed by a server key of the root that signs
    the version (only the server aggregates; a client key cannot publish a "group")."""
    for entry in meta.entries:
        if entry.contributors is None or entry.adapter_sha256 in known:
            continue
        if root.keys.get(entry.client) != entry.client_key:
            raise RegistryError(
                f"{what}: group adapter {entry.adapter_sha256[:16]} is signed by key "
                f"{entry.client}, which is not a server key of root {root.version}"
            )


def verify_metadata(
    files: RegistryFiles,
    trusted: TrustedState | None,
    now: datetime,
    *,
    expected_root_sha256: str | None = None,
) -> VerifiedRegistry:
    """Steps 1-5 of the module docstring; raises RegistryError (or a subclass), SignatureError
    or FormatError on the first failure. Pure: the trusted state is not touched.

    ``expected_root_sha256`` pins root 1 on first use (no trusted state) instead of TOFU.
    """
    n = parse_pointer(files.pointer)
    # 1. Rollback against the trusted state.
    if trusted is not None and n < trusted.registry_version:
        raise RollbackError(
            f"registry offers version {n}, older than the trusted version "
            f"{trusted.registry_version}: rollback"
        )
    if len(files.metadata) != n:
        raise RegistryError(f"latest.json names version {n} but {len(files.metadata)} were read")
    # 2. Root chain, from the trusted root (or a pinned / first-use root 1).
    if trusted is None and expected_root_sha256 not in (None, _sha(files.roots[0])):
        raise RegistryError(
            f"root/1.root.json has SHA-256 {_sha(files.roots[0])[:16]}..., not the pinned "
            f"{str(expected_root_sha256)[:16]}...: another server's registry"
        )
    if trusted is not None and _sha(files.roots[0]) != trusted.registry_id:
        raise RegistryError(
            "root/1.root.json is not the first root of the registry this client trusts: "
            "another registry, or its history was rewritten"
        )
    roots = verify_root_chain(
        files.roots,
        trusted_version=None if trusted is None else trusted.root_version,
        trusted_sha256=None if trusted is None else trusted.root_sha256,
    )
    # 3. History.
    start = 0 if trusted is None else trusted.registry_version
    previous: RegistryMetadata | None = None
    if trusted is not None:
        pinned = files.metadata[start - 1]
        if _sha(pinned) != trusted.registry_sha256:
            raise ForkError(
                f"metadata/{start}.registry.json differs from the version {start} this client "
                "trusted: the registry shows a different history (split view)"
            )
        previous, _ = _payload(pinned, f"metadata/{start}.registry.json")
    signed: frozenset[str] = frozenset()
    cache: dict[str, Entry] = {}  # entries repeat in every version: validate each once
    for v in range(start + 1, n + 1):
        prev_data = files.metadata[v - 2] if v > 1 else None
        previous, signed = verify_version(
            v, files.metadata[v - 1], prev_data, previous, roots, cache
        )
    if previous is None:  # pragma: no cover - n >= 1 always leaves a version
        raise RegistryError("registry has no versions")
    newest = previous
    if start == n:  # nothing new: re-verify the trusted newest version's signatures
        _, envelope = _payload(files.metadata[n - 1], f"metadata/{n}.registry.json")
        root = roots[newest.root_version - 1]
        signed = verify_threshold(envelope, root.keys, root.threshold, "newest version").signed
    if newest.root_version != len(roots):
        raise RegistryError(
            f"version {n} is signed under root {newest.root_version}, not the newest root "
            f"{len(roots)} read for it"
        )
    # 4. Freeze: expiry after the chain is walked.
    if now >= newest.expires:
        raise FreezeError(
            f"registry version {n} expired at {format_time(newest.expires)} (now "
            f"{format_time(now)}): the server stopped publishing or a mirror serves stale data"
        )
    if now >= roots[-1].expires:
        raise FreezeError(
            f"root version {roots[-1].version} expired at {format_time(roots[-1].expires)}"
        )
    # 5. Transparency log.
    leaves = [merkle.leaf_hash(data) for data in files.metadata]
    head = verify_tree_head(files.tree_head, roots[-1], leaves, trusted)
    state = TrustedState(
        registry_id=_sha(files.roots[0]),
        root_version=len(roots),
        root_sha256=_sha(files.roots[-1]),
        registry_version=n,
        registry_sha256=_sha(files.metadata[n - 1]),
        tree_size=head.tree_size,
        tree_root=head.root_hash.hex(),
        audited=now,
    )
    return VerifiedRegistry(newest, roots[-1], head, signed, state, trusted is None)
