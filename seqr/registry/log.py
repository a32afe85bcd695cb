"""The registry's transparency log (RFC 9162): every targets version is a leaf.

Leaf k is the exact bytes of ``metadata/k.targets.json`` (consistent snapshots keep every
version). The signed tree head of size N rides in snapshot metadata as its ``x-seqr-log``
field, so the snapshot role's threshold signs it (TUF signs the canonical form of the whole
``signed`` object, extension fields included). A client keeps the leaf hashes it verified
(32 bytes per version) and, on every refresh, requires the new signed tree to extend them:
an RFC 9162 consistency proof from its trusted size to the new size and an inclusion proof of
the newest targets version must verify against the signed root (merkle.py). A publisher that
rewrites or drops history, or shows two clients two registries, fails that (fork).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from seqr.core.errors import ForkError, FormatError, RegistryError
from seqr.registry import merkle
from seqr.registry.codec import Fields, check_hex, dumps, format_time, loads

__all__ = ["TreeHead", "LogState", "check_extension", "leaf_of"]

_SHA = merkle.HASH_BYTES


@dataclass(frozen=True)
class TreeHead:
    """RFC 9162 section 4.10 tree head: size, root hash and when it was made."""

    tree_size: int
    root_hash: bytes
    timestamp: datetime

    @classmethod
    def of(cls, leaves: Sequence[bytes], when: datetime) -> TreeHead:
        return cls(len(leaves), merkle.root_hash(leaves), when)

    def to_field(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "timestamp": format_time(self.timestamp),
        }

    @classmethod
    def from_field(cls, value: object, what: str) -> TreeHead:
        f = Fields(value, what, ("tree_size", "root_hash", "timestamp"))
        return cls(
            f.integer("tree_size", low=1),
            bytes.fromhex(f.hex("root_hash", _SHA)),
            f.time("timestamp"),
        )


@dataclass(frozen=True)
class LogState:
    """What a client trusts of the log: every leaf hash it verified, in order."""

    leaves: tuple[bytes, ...] = ()

    @property
    def head(self) -> tuple[int, bytes]:
        return len(self.leaves), merkle.root_hash(self.leaves)

    def to_bytes(self) -> bytes:
        return dumps({"leaves": [leaf.hex() for leaf in self.leaves]})

    @classmethod
    def from_bytes(cls, data: bytes, what: str, max_leaves: int) -> LogState:
        f = Fields(loads(data, what), what, ("leaves",))
        raw = f.array("leaves", max_len=max_leaves)
        leaves = tuple(
            bytes.fromhex(check_hex(x, _SHA, f"{what}.leaves[{i}]")) for i, x in enumerate(raw)
        )
        return cls(leaves)


def check_extension(
    trusted: LogState,
    new_leaves: Sequence[bytes],
    head: TreeHead,
    *,
    now: datetime,
    max_clock_skew: timedelta,
) -> LogState:
    """The trusted log extended by ``new_leaves`` is exactly the signed tree ``head``.

    Raises ForkError when the signed tree is not an append-only extension of the trusted one
    (RFC 9162 section 2.1.4 consistency) and RegistryError when the head is malformed or its
    newest leaf is not included (section 2.1.3). Returns the new trusted state.
    """
    leaves = [*trusted.leaves, *new_leaves]
    m, trusted_root = trusted.head
    if head.tree_size != len(leaves):
        raise ForkError(
            f"signed tree head says {head.tree_size} versions, but the log has {len(leaves)} "
            f"(trusted {m} + {len(new_leaves)} new): the log was rewritten or truncated"
        )
    if head.timestamp > now + max_clock_skew:
        raise RegistryError(
            f"signed tree head is dated {format_time(head.timestamp)}, after this client's "
            f"time {format_time(now)}: the publisher's clock is wrong"
        )
    if merkle.root_hash(leaves) != head.root_hash:
        raise ForkError(
            f"the signed log of {head.tree_size} versions is not the {m} versions this client "
            f"trusts extended by the {len(new_leaves)} new one(s): the publisher rewrote its "
            "history or shows different registries to different clients (fork, split view)"
        )
    # RFC 9162 2.1.4.2: the new tree contains the trusted one (split view / fork otherwise).
    proof = merkle.consistency_proof(leaves, m)
    merkle.verify_consistency(m, len(leaves), trusted_root, head.root_hash, proof)
    index = len(leaves) - 1  # RFC 9162 2.1.3.2: the newest version is in the signed tree
    path = merkle.inclusion_proof(leaves, index)
    merkle.verify_inclusion(leaves[index], index, len(leaves), path, head.root_hash)
    return LogState(tuple(leaves))


def leaf_of(targets_bytes: bytes) -> bytes:
    """The leaf hash of one targets metadata file (RFC 9162 2.1.1)."""
    if not targets_bytes:
        raise FormatError("an empty targets file cannot be a log leaf")
    return merkle.leaf_hash(targets_bytes)
