"""Signed tree heads of the registry's transparency log (RFC 9162 section 4.10).

The log has one leaf per registry version: the exact bytes of metadata/<v>.registry.json.
Its head is signed by the newest root's threshold like every other registry file, so a
client checks the SIGNED head, not only that a root hash matches (SECURITY.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core.errors import RegistryError, RollbackError
from seqr.registry import merkle
from seqr.registry.codec import Fields, check_hex, dumps, format_time, loads
from seqr.registry.envelope import (
    TREE_HEAD_TYPE,
    parse_envelope,
    sign_envelope,
    verify_threshold,
)
from seqr.registry.metadata import SPEC_VERSION, Root
from seqr.registry.trusted_state import TrustedState

__all__ = ["TreeHead", "sign_tree_head", "verify_tree_head"]

_SHA = 32


@dataclass(frozen=True)
class TreeHead:
    """RFC 9162 signed tree head (section 4.10) for the log of registry versions."""

    tree_size: int
    root_hash: bytes
    timestamp: datetime
    root_version: int  # the root whose keys sign this head
    inclusion: tuple[bytes, ...]  # audit path of leaf tree_size-1 (RFC 9162 section 2.1.3)
    consistency: tuple[bytes, ...]  # proof from tree_size-1 (RFC 9162 section 2.1.4)

    def to_payload(self) -> bytes:
        return dumps(
            {
                "_type": "tree_head",
                "spec_version": SPEC_VERSION,
                "tree_size": self.tree_size,
                "root_hash": self.root_hash.hex(),
                "timestamp": format_time(self.timestamp),
                "root_version": self.root_version,
                "inclusion": [h.hex() for h in self.inclusion],
                "consistency": [h.hex() for h in self.consistency],
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, what: str = "tree head") -> TreeHead:
        f = Fields(
            loads(payload, what),
            what,
            (
                "_type",
                "spec_version",
                "tree_size",
                "root_hash",
                "timestamp",
                "root_version",
                "inclusion",
                "consistency",
            ),
        )
        f.const("_type", "tree_head")
        f.const("spec_version", SPEC_VERSION)

        def path(key: str) -> tuple[bytes, ...]:
            items = f.array(key, max_len=64)  # log2 of any tree we can hold
            return tuple(
                bytes.fromhex(check_hex(h, _SHA, f"{f.path(key)}[{i}]"))
                for i, h in enumerate(items)
            )

        return cls(
            tree_size=f.integer("tree_size", low=1),
            root_hash=bytes.fromhex(f.hex("root_hash", _SHA)),
            timestamp=f.time("timestamp"),
            root_version=f.integer("root_version", low=1),
            inclusion=path("inclusion"),
            consistency=path("consistency"),
        )


def sign_tree_head(
    leaves: list[bytes], root: Root, when: datetime, keys: Sequence[EllipticCurvePrivateKey]
) -> bytes:
    """The signed RFC 9162 head (section 4.10) over ``leaves``, with the inclusion proof of
    the newest leaf and the consistency proof from the previous size."""
    n = len(leaves)
    head = TreeHead(
        tree_size=n,
        root_hash=merkle.root_hash(leaves),
        timestamp=when,
        root_version=root.version,
        inclusion=tuple(merkle.inclusion_proof(leaves, n - 1)),
        consistency=tuple(merkle.consistency_proof(leaves, n - 1)) if n > 1 else (),
    )
    return sign_envelope(TREE_HEAD_TYPE, head.to_payload(), keys)


def verify_tree_head(
    data: bytes, root: Root, leaves: Sequence[bytes], trusted: TrustedState | None
) -> TreeHead:
    """RFC 9162 checks of the signed tree head over the leaves of all versions."""
    n = len(leaves)
    what = f"log/{n}.tree_head.json"
    envelope = parse_envelope(data, TREE_HEAD_TYPE, what)
    head = TreeHead.from_payload(envelope.payload, what)
    # Verify the signed tree head itself, not only that a root hash matches (SECURITY.md).
    verify_threshold(envelope, root.keys, root.threshold, what)
    if head.root_version != root.version or head.tree_size != n:
        raise RegistryError(
            f"{what} is for tree size {head.tree_size} under root {head.root_version}; "
            f"expected size {n} under root {root.version} (mix-and-match)"
        )
    computed = merkle.root_hash(leaves)
    if computed != head.root_hash:
        raise RegistryError(
            f"{what} signs Merkle root {head.root_hash.hex()[:16]}... but the {n} version files "
            f"give {computed.hex()[:16]}...: a version file was changed, added or removed"
        )
    # The head's own proofs, as a light client holding only the newest version would check.
    merkle.verify_inclusion(leaves[-1], n - 1, n, head.inclusion, head.root_hash)
    if n > 1:
        previous_root = merkle.root_hash(leaves[:-1])
        merkle.verify_consistency(n - 1, n, previous_root, head.root_hash, head.consistency)
    if trusted is not None:
        m = trusted.tree_size
        if m > n:
            raise RollbackError(f"log shrank from trusted size {m} to {n}")
        merkle.verify_consistency(
            m,
            n,
            bytes.fromhex(trusted.tree_root),
            head.root_hash,
            merkle.consistency_proof(leaves, m),
        )
    return head
