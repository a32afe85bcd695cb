"""RFC 9162 Merkle tree: CT reference vectors, exhaustive small-tree proofs, tampering fails."""

from __future__ import annotations

import hashlib

import pytest

from seqr.core.errors import ForkError, RegistryError
from seqr.registry import merkle

# The Certificate Transparency reference vectors (RFC 6962 / RFC 9162 hashing; the same eight
# leaves and roots are used by the C++ and Go CT implementations' merkle tests).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (leaf index, tree size, audit path)
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
CT_CONSISTENCY = [  # (first size, second size, proof)
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
MAX_N = 20  # exhaustive over every 0 <= m <= n <= MAX_N


def _leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [merkle.leaf_hash(salt + i.to_bytes(4, "big")) for i in range(n)]


def _reference_mth(data: list[bytes]) -> bytes:
    """MTH written straight from RFC 9162 section 2.1.1 over leaf DATA, with list slices."""
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + _reference_mth(data[:k]) + _reference_mth(data[k:])).digest()


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 0x01]) + h[1:]


def test_roots_match_certificate_transparency_vectors() -> None:
    hashes = [merkle.leaf_hash(d) for d in CT_LEAVES]
    for n in range(len(CT_LEAVES) + 1):
        assert merkle.root_hash(hashes[:n]).hex() == CT_ROOTS[n], f"size {n}"


def test_root_matches_rfc_definition_for_ragged_trees() -> None:
    for n in range(0, 41):
        data = [bytes([i, i * 7 % 256]) for i in range(n)]
        assert merkle.root_hash([merkle.leaf_hash(d) for d in data]) == _reference_mth(data)


@pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
def test_inclusion_proofs_match_certificate_transparency_vectors(
    index: int, size: int, path: list[str]
) -> None:
    hashes = [merkle.leaf_hash(d) for d in CT_LEAVES[:size]]
    proof = merkle.inclusion_proof(hashes, index)
    assert [p.hex() for p in proof] == path
    merkle.verify_inclusion(hashes[index], index, size, proof, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize(("first", "second", "path"), CT_CONSISTENCY)
def test_consistency_proofs_match_certificate_transparency_vectors(
    first: int, second: int, path: list[str]
) -> None:
    hashes = [merkle.leaf_hash(d) for d in CT_LEAVES[:second]]
    proof = merkle.consistency_proof(hashes, first)
    assert [p.hex() for p in proof] == path
    merkle.verify_consistency(
        first, second, bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second]), proof
    )


def test_every_inclusion_proof_verifies_and_every_tampering_fails() -> None:
    checked = 0
    for n in range(1, MAX_N + 1):
        hashes = _leaves(n)
        root = merkle.root_hash(hashes)
        for i in range(n):
            proof = merkle.inclusion_proof(hashes, i)
            merkle.verify_inclusion(hashes[i], i, n, proof, root)
            bad_cases: list[tuple[bytes, int, int, list[bytes], bytes]] = [
                (_flip(hashes[i]), i, n, proof, root),  # another leaf
                (hashes[i], i, n, proof, _flip(root)),  # another root
                (hashes[i], i, n, [*proof, hashes[0]], root),  # one hash too many
            ]
            if proof:
                bad_cases.append((hashes[i], i, n, proof[:-1], root))  # one hash too few
            for j in range(len(proof)):  # each path element altered
                bad_cases.append(
                    (hashes[i], i, n, [*proof[:j], _flip(proof[j]), *proof[j + 1 :]], root)
                )
            # Claimed at another index. (The same path in a tree of another SIZE can verify: the
            # signed tree head binds size and root together, RFC 9162 section 4.10.)
            for other in range(n + 1):
                if other != i:
                    bad_cases.append((hashes[i], other, n, proof, root))
            for leaf, index, size, path, r in bad_cases:
                with pytest.raises(RegistryError):
                    merkle.verify_inclusion(leaf, index, size, path, r)
                checked += 1
    assert checked > 1000  # the loops above really ran


def test_every_consistency_proof_verifies_and_every_tampering_fails() -> None:
    checked = 0
    for n in range(0, MAX_N + 1):
        hashes = _leaves(n)
        second = merkle.root_hash(hashes)
        for m in range(0, n + 1):
            first = merkle.root_hash(hashes[:m])
            proof = merkle.consistency_proof(hashes, m)
            merkle.verify_consistency(m, n, first, second, proof)
            bad_cases: list[tuple[int, int, bytes, bytes, list[bytes]]] = [
                (m, n, _flip(first), second, proof),  # another first root
                (m, n, first, second, [*proof, second]),  # one hash too many
            ]
            if m > 0:  # (the empty tree is a prefix of every tree, whatever its root)
                bad_cases.append((m, n, first, _flip(second), proof))  # another second root
            if proof:
                bad_cases.append((m, n, first, second, proof[:-1]))  # one hash too few
                bad_cases.append((m, n, first, second, proof[1:]))
            for j in range(len(proof)):
                bad_cases.append(
                    (m, n, first, second, [*proof[:j], _flip(proof[j]), *proof[j + 1 :]])
                )
            if m < n:  # the sizes swapped: a log that shrank
                bad_cases.append((n, m, second, first, proof))
            for other_m in range(1, n + 1):  # the proof claimed for another first size
                if other_m != m and merkle.root_hash(hashes[:other_m]) != first:
                    bad_cases.append((other_m, n, first, second, proof))
            for args in bad_cases:
                with pytest.raises(ForkError):
                    merkle.verify_consistency(*args)
                checked += 1
    assert checked > 1500


def test_split_view_with_shared_prefix_fails_consistency() -> None:
    # Two logs agree on the first 5 leaves, then differ: a client holding the 7-leaf head of
    # one cannot be convinced that the 12-leaf head of the other extends it.
    honest = _leaves(12)
    forked = honest[:5] + _leaves(7, salt=b"fork")
    trusted_size, trusted_root = 7, merkle.root_hash(honest[:7])
    proof = merkle.consistency_proof(forked, trusted_size)
    with pytest.raises(ForkError, match="split view"):
        merkle.verify_consistency(trusted_size, 12, trusted_root, merkle.root_hash(forked), proof)
    # The honest continuation passes.
    merkle.verify_consistency(
        7, 12, trusted_root, merkle.root_hash(honest), merkle.consistency_proof(honest, 7)
    )


def test_same_size_different_root_is_a_fork() -> None:
    a, b = _leaves(6), _leaves(6, salt=b"other")
    with pytest.raises(ForkError, match="same tree size"):
        merkle.verify_consistency(6, 6, merkle.root_hash(a), merkle.root_hash(b), [])


def test_malformed_hashes_are_rejected() -> None:
    with pytest.raises(RegistryError, match="32 raw bytes"):
        merkle.root_hash([b"short"])
    with pytest.raises(RegistryError, match="outside"):
        merkle.inclusion_proof(_leaves(3), 3)
    with pytest.raises(ForkError):
        merkle.consistency_proof(_leaves(3), 4)
