"""RFC 9162 (Certificate Transparency v2) Merkle tree: hashes, inclusion and consistency proofs.

The registry's transparency log is an append-only list of leaves (one per registry version:
the exact bytes of that version's signed metadata file). Everything here follows RFC 9162
section 2.1 to the letter so that any CT tooling could check our proofs:

- leaf hash  = SHA-256(0x00 || leaf)                           (section 2.1.1)
- node hash  = SHA-256(0x01 || left || right)                  (section 2.1.1)
- MTH({})    = SHA-256()  (hash of the empty string)           (section 2.1.1)
- MTH(D[n])  splits at k, the largest power of two < n         (section 2.1.1)
- PATH / inclusion verification                                (sections 2.1.3.1, 2.1.3.2)
- PROOF / SUBPROOF / consistency verification                  (sections 2.1.4.1, 2.1.4.2)

Functions take leaf HASHES (32 bytes each), not leaf data, so a caller hashes each leaf once.
Verification raises RegistryError (inclusion) or ForkError (consistency: the second tree is
not an append-only extension of the first, i.e. a split view); it never returns False.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from seqr.core.errors import ForkError, RegistryError

__all__ = [
    "HASH_BYTES",
    "EMPTY_ROOT",
    "leaf_hash",
    "node_hash",
    "root_hash",
    "inclusion_proof",
    "consistency_proof",
    "verify_inclusion",
    "verify_consistency",
]

HASH_BYTES = 32  # SHA-256
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 9162 section 2.1.1: MTH({}) = HASH()


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 section 2.1.1: MTH({d(0)}) = HASH(0x00 || d(0))."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 section 2.1.1: HASH(0x01 || MTH(left) || MTH(right))."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """k: the largest power of two strictly smaller than n (n >= 2), RFC 9162 section 2.1.1."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) over leaf hashes, recursing on index ranges (no list copies)."""
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the tree whose leaves have these hashes (RFC 9162 section 2.1.1)."""
    _check_hashes(leaf_hashes)
    return _mth(leaf_hashes, 0, len(leaf_hashes))


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 section 2.1.3.1: the audit path of leaf ``index``."""
    _check_hashes(leaf_hashes)
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise RegistryError(f"leaf index {index} is outside a tree of size {n}")
    return _path(leaf_hashes, index, 0, n)


def _path(hashes: Sequence[bytes], m: int, lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []  # PATH(0, {d(0)}) = {}
    k = _split(n)
    if m < k:  # PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n])
        return _path(hashes, m, lo, lo + k) + [_mth(hashes, lo + k, hi)]
    # PATH(m, D[n]) = PATH(m - k, D[k:n]) : MTH(D[0:k])
    return _path(hashes, m - k, lo + k, hi) + [_mth(hashes, lo, lo + k)]


def consistency_proof(leaf_hashes: Sequence[bytes], first_size: int) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1 with m = ``first_size``, n = len(leaves).

    For m == n and m == 0 the proof is empty (nothing to prove; the verifier then compares
    roots directly, resp. accepts any second tree).
    """
    _check_hashes(leaf_hashes)
    n = len(leaf_hashes)
    if not 0 <= first_size <= n:
        raise ForkError(f"first tree size {first_size} is not between 0 and {n}")
    if first_size in (0, n):
        return []
    return _subproof(leaf_hashes, first_size, 0, n, True)


def _subproof(hashes: Sequence[bytes], m: int, lo: int, hi: int, b: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        # SUBPROOF(m, D[m], true) = {}; SUBPROOF(m, D[m], false) = {MTH(D[m])}
        return [] if b else [_mth(hashes, lo, hi)]
    k = _split(n)
    if m <= k:  # SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
        return _subproof(hashes, m, lo, lo + k, b) + [_mth(hashes, lo + k, hi)]
    # SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
    return _subproof(hashes, m - k, lo + k, hi, False) + [_mth(hashes, lo, lo + k)]


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that leaf hash ``leaf`` sits at ``index`` of the tree with ``root`` (RFC 9162 2.1.3.2).

    Raises RegistryError naming the first thing that does not hold.
    """
    _check_hashes([leaf, root, *proof])
    # Step 1: leaf_index >= tree_size fails.
    if not 0 <= index < tree_size:
        raise RegistryError(f"inclusion proof: leaf index {index} is outside tree size {tree_size}")
    fn, sn = index, tree_size - 1  # step 2
    r = leaf  # step 3
    for p in proof:  # step 4
        if sn == 0:
            raise RegistryError(
                f"inclusion proof for leaf {index} of {tree_size} is longer than the tree allows"
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # Step 5: sn must be 0 and r must equal the root.
    if sn != 0:
        raise RegistryError(
            f"inclusion proof for leaf {index} of {tree_size} is too short ({len(proof)} hashes)"
        )
    if r != root:
        raise RegistryError(
            f"inclusion proof for leaf {index} of {tree_size} leads to root {r.hex()[:16]}..., "
            f"not the signed root {root.hex()[:16]}...: the leaf is not in this log"
        )


def verify_consistency(
    first_size: int,
    second_size: int,
    first_root: bytes,
    second_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Check that the tree (second_size, second_root) extends (first_size, first_root).

    RFC 9162 section 2.1.4.2, plus the two trivial cases the RFC leaves to the caller:
    m == n (the roots must be equal, the proof empty) and m == 0 (the empty tree is a prefix
    of every tree; the proof must be empty). Raises ForkError: a failure means the log
    operator shows two histories that are not one append-only list (split view).
    """
    _check_hashes([first_root, second_root, *proof])
    m, n = first_size, second_size
    if not 0 <= m <= n:
        raise ForkError(
            f"log shrank or went back: trusted tree size {m} > new tree size {n} (or negative)"
        )
    if m == 0 and first_root != EMPTY_ROOT:
        raise ForkError("a tree of size 0 must have the empty root SHA-256('')")
    if m == n:
        if proof:
            raise ForkError(f"consistency proof between equal sizes {m} must be empty")
        if first_root != second_root:
            raise ForkError(
                f"two different roots for the same tree size {m}: {first_root.hex()[:16]}... "
                f"and {second_root.hex()[:16]}... (split view)"
            )
        return
    if m == 0:
        if proof:
            raise ForkError("consistency proof from the empty tree must be empty")
        return
    path = list(proof)
    # Step 1: an empty consistency_path fails.
    if not path:
        raise ForkError(f"consistency proof from size {m} to {n} is empty")
    # Step 2: if first is an exact power of 2, prepend first_hash.
    if m & (m - 1) == 0:
        path.insert(0, first_root)
    # Step 3.
    fn, sn = m - 1, n - 1
    # Step 4: if LSB(fn) is set, right-shift fn and sn until LSB(fn) is not set.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Step 5.
    fr = sr = path[0]
    # Step 6.
    for c in path[1:]:
        if sn == 0:
            raise ForkError(f"consistency proof from size {m} to {n} has too many hashes")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # Step 7: fr == first_hash, sr == second_hash and sn == 0.
    if sn != 0:
        raise ForkError(f"consistency proof from size {m} to {n} has too few hashes")
    if fr != first_root:
        raise ForkError(
            f"log of size {n} does not contain the trusted tree of size {m}: proof gives "
            f"{fr.hex()[:16]}..., trusted root is {first_root.hex()[:16]}... (split view)"
        )
    if sr != second_root:
        raise ForkError(
            f"consistency proof from size {m} leads to root {sr.hex()[:16]}..., not the "
            f"signed root {second_root.hex()[:16]}... of size {n}"
        )


def _check_hashes(hashes: Sequence[bytes]) -> None:
    for h in hashes:
        if not isinstance(h, bytes | bytearray) or len(h) != HASH_BYTES:
            raise RegistryError(
                f"Merkle hashes must be {HASH_BYTES} raw bytes, got "
                f"{type(h).__name__} of length {len(h) if hasattr(h, '__len__') else '?'}"
            )
