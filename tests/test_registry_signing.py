"""What the registry signs beside TUF: strict JSON for its documents, the seqr records in
targets metadata, and DSSE's pre-authentication encoding for group contributions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from seqr.core import signing
from seqr.core.errors import FormatError
from seqr.registry import codec
from seqr.registry.envelope import pae
from seqr.registry.metadata import AdapterRecord, ClientKey, RegistryDocument, Revocation

T0 = datetime(2025, 6, 1, tzinfo=UTC)


def test_pae_matches_the_dsse_specification_example() -> None:
    # github.com/secure-systems-lab/dsse protocol.md, "PAE" example.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


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


def test_registry_document_roundtrips_and_refuses_a_key_both_allowed_and_revoked() -> None:
    alice, bob = (signing.public_key_bytes(signing.generate_private_key()) for _ in "ab")
    a, b = signing.fingerprint(alice), signing.fingerprint(bob)
    doc = RegistryDocument(
        clients={a: ClientKey(a, alice, T0)},
        revoked={b: Revocation(b, bob, T0, "left \u00e9")},
    )
    assert RegistryDocument.from_bytes(doc.to_bytes()) == doc
    both = doc.to_bytes().replace(b'"revoked":{"' + b.encode(), b'"revoked":{"' + a.encode())
    with pytest.raises(FormatError):
        RegistryDocument.from_bytes(both)


def test_a_key_id_must_be_the_fingerprint_of_its_key() -> None:
    alice, bob = (signing.public_key_bytes(signing.generate_private_key()) for _ in "ab")
    a = signing.fingerprint(alice)
    doc = RegistryDocument(clients={a: ClientKey(a, bob, T0)})  # bob's key under alice's id
    with pytest.raises(FormatError, match="not the fingerprint of its key"):
        RegistryDocument.from_bytes(doc.to_bytes())


def test_adapter_record_roundtrips_and_refuses_unknown_fields() -> None:
    record = AdapterRecord("a" * 64, "code", "sha256:" + "b" * 64, T0, "c" * 64, "d" * 64,
                           ("adapter_model.safetensors", "manifest.json"), ("x", "y"))  # fmt: skip
    assert AdapterRecord.from_custom(record.to_custom(), "record") == record
    with pytest.raises(FormatError, match="unknown field"):
        AdapterRecord.from_custom({**record.to_custom(), "extra": 1}, "record")
    with pytest.raises(FormatError, match="sorted"):
        AdapterRecord.from_custom({**record.to_custom(), "contributors": ["y", "x"]}, "record")
