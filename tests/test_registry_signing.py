"""Signed registry metadata: DSSE envelopes, k-of-n thresholds, strict JSON, root rotation."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from registry_fixtures import ROTATIONS, duplicate_first_signature

from seqr.core import signing
from seqr.core.errors import FormatError, RegistryError, SignatureError
from seqr.registry import codec
from seqr.registry.envelope import (
    REGISTRY_TYPE,
    ROOT_TYPE,
    pae,
    parse_envelope,
    sign_envelope,
    threshold_result,
    verify_threshold,
)
from seqr.registry.metadata import Root
from seqr.registry.roots import make_root, sign_root, verify_root_chain, verify_root_update

T0 = datetime(2025, 6, 1, tzinfo=UTC)
KEYS = {name: signing.generate_private_key() for name in "ABCDE"}
PUB = {name: signing.public_key_bytes(k) for name, k in KEYS.items()}


def _keyset(names: str) -> dict[str, bytes]:
    return {signing.fingerprint(PUB[n]): PUB[n] for n in names}


def _root(version: int, names: str, threshold: int) -> Root:
    return make_root(version, [PUB[n] for n in names], threshold, T0, T0 + timedelta(days=365))


def test_pae_matches_the_dsse_specification_example() -> None:
    # DSSE protocol.md: PAE("http://example.com/HelloWorld", "hello world").
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_envelope_roundtrip_signs_exact_payload_bytes() -> None:
    payload = b'{"b":1,  "a":2}'  # not canonical on purpose: the exact bytes are what count
    data = sign_envelope(REGISTRY_TYPE, payload, [KEYS["A"], KEYS["B"]])
    envelope = parse_envelope(data, REGISTRY_TYPE, "test")
    assert envelope.payload == payload
    result = verify_threshold(envelope, _keyset("AB"), 2, "test")
    assert result.signed == frozenset(_keyset("AB"))


def test_threshold_counts_each_key_once() -> None:
    data = duplicate_first_signature(sign_envelope(REGISTRY_TYPE, b"{}", [KEYS["A"]]))
    envelope = parse_envelope(data, REGISTRY_TYPE, "test")
    assert len(envelope.signatures) == 2
    result = threshold_result(envelope, _keyset("AB"), 2)
    assert result.signed == frozenset(_keyset("A")) and not result.verified
    with pytest.raises(SignatureError, match="1/2"):
        verify_threshold(envelope, _keyset("AB"), 2, "test")


def test_signatures_by_unknown_keys_and_invalid_signatures_do_not_count() -> None:
    data = sign_envelope(REGISTRY_TYPE, b"{}", [KEYS["A"], KEYS["E"]])
    obj = json.loads(data)
    obj["signatures"][0]["sig"] = base64.b64encode(b"\x00" * 64).decode()  # A's, broken
    envelope = parse_envelope(json.dumps(obj).encode(), REGISTRY_TYPE, "test")
    result = threshold_result(envelope, _keyset("AB"), 1)  # E is not trusted
    assert result.signed == frozenset() and not result.verified


def test_payload_type_is_signed_so_a_root_is_not_a_registry() -> None:
    data = sign_envelope(ROOT_TYPE, b"{}", [KEYS["A"]])
    with pytest.raises(FormatError, match="payloadType"):
        parse_envelope(data, REGISTRY_TYPE, "test")
    obj = json.loads(data)
    obj["payloadType"] = REGISTRY_TYPE  # relabel: the signature no longer verifies
    envelope = parse_envelope(json.dumps(obj).encode(), REGISTRY_TYPE, "test")
    assert not threshold_result(envelope, _keyset("A"), 1).verified


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"version": 1.0}', "not an integer"),
        (b'{"version": NaN}', "NaN"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b"\xff\xfe", "UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"a": ', "not valid JSON"),
    ],
)
def test_signed_json_is_strict(text: bytes, problem: str) -> None:
    with pytest.raises(FormatError, match=problem):
        codec.loads(text, "metadata")


def test_root_payload_roundtrip_and_unknown_fields_rejected() -> None:
    root = _root(1, "ABC", 2)
    assert Root.from_payload(root.to_payload()) == root
    obj = json.loads(root.to_payload())
    obj["extra"] = 1
    with pytest.raises(FormatError, match="unknown field"):
        Root.from_payload(codec.dumps(obj))
    obj = json.loads(root.to_payload())
    obj["threshold"] = 4  # more than the three keys: could never be met
    with pytest.raises(FormatError, match="threshold"):
        Root.from_payload(codec.dumps(obj))
    obj = json.loads(root.to_payload())
    keyid = next(iter(obj["keys"]))
    obj["keys"][keyid] = PUB["D"].hex()  # key id is not the key's fingerprint
    with pytest.raises(FormatError, match="fingerprint"):
        Root.from_payload(codec.dumps(obj))


@pytest.mark.parametrize(
    ("case", "old", "new", "signers", "expected"), ROTATIONS, ids=[r[0] for r in ROTATIONS]
)
def test_root_update_table(
    case: str, old: tuple[str, int], new: tuple[str, int], signers: str, expected: bool
) -> None:
    """ROTATIONS on the pure root update (the end-to-end audit is in test_registry_attacks)."""
    trusted = _root(1, *old)
    candidate = _root(2, *new)
    unique = list(dict.fromkeys(signers))
    data = sign_root(candidate, [KEYS[n] for n in unique])
    if len(unique) < len(signers):  # a key that "signs twice"
        data = duplicate_first_signature(data)
    if expected:
        assert verify_root_update(trusted, data, "root/2.root.json") == candidate
    else:
        with pytest.raises(SignatureError, match="signed by"):
            verify_root_update(trusted, data, "root/2.root.json")


def test_root_version_must_increase_by_exactly_one() -> None:
    trusted = _root(1, "A", 1)
    skipped = sign_root(_root(3, "A", 1), [KEYS["A"]])
    with pytest.raises(RegistryError, match="must be version 2"):
        verify_root_update(trusted, skipped, "root/2.root.json")


def test_root_chain_walks_rotations_and_pins_the_trusted_root() -> None:
    r1 = sign_root(_root(1, "A", 1), [KEYS["A"]])
    r2 = sign_root(_root(2, "B", 1), [KEYS["A"], KEYS["B"]])
    r3 = sign_root(_root(3, "BC", 2), [KEYS["B"], KEYS["C"]])
    roots = verify_root_chain([r1, r2, r3], trusted_version=None, trusted_sha256=None)
    assert [r.version for r in roots] == [1, 2, 3] and roots[-1].threshold == 2
    import hashlib

    pinned = hashlib.sha256(r2).hexdigest()
    assert verify_root_chain([r1, r2, r3], trusted_version=2, trusted_sha256=pinned)[-1] == roots[2]
    forged_r2 = sign_root(_root(2, "E", 1), [KEYS["E"]])
    with pytest.raises(RegistryError, match="not the root this client trusts"):
        verify_root_chain([r1, forged_r2, r3], trusted_version=2, trusted_sha256=pinned)
