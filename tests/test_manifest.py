"""An export's manifest and its model-signing bundle: what tampering with an export looks like.

Attacks on the bundle itself (swapped, re-signed, hiding files, other formats) are in
tests/test_model_signature.py; the real `model_signing` CLI against exports in
tests/test_model_signing_cli.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _signed_export import A_SHA, BASE_SHA, CREATED, TARGETS, make_export, make_key
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from seqr.core import key_files, signing
from seqr.core.errors import FormatError, SignatureError
from seqr.core.manifest import (
    EXPORT_FILE_NAMES,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    manifest_sha256,
    parse_manifest,
    read_export,
    sign_export,
    verify_export_files,
)
from seqr.core.model_signature import MAX_BUNDLE_BYTES


@pytest.fixture
def key(tmp_path: Path) -> key_files.SigningKeyFile:
    return make_key(tmp_path / "key")


@pytest.fixture
def export(tmp_path: Path, key: key_files.SigningKeyFile) -> Path:
    make_export(tmp_path / "export", key)
    return tmp_path / "export"


def _manifest_dict(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_NAME).read_bytes())


# --- happy path ---------------------------------------------------------------------------


def test_signed_export_verifies(export: Path, key: key_files.SigningKeyFile) -> None:
    manifest = verify_export_files(read_export(export))
    assert manifest.public_key == key.public.hex()
    assert manifest.fingerprint == signing.fingerprint(key.public)
    assert manifest.created == CREATED
    assert manifest.target_modules == tuple(sorted(TARGETS))
    assert (
        set(read_export(export))
        == EXPORT_FILE_NAMES
        == {
            "adapter_config.json",
            "adapter_model.safetensors",
            "norm_stats.json",
            "manifest.json",
            "model.sig",
        }
    )


def test_bundle_signs_every_file_including_the_manifest(export: Path) -> None:
    files = read_export(export)
    bundle = json.loads(files[SIGNATURE_NAME])
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    listed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    assert listed == {
        n: hashlib.sha256(b).hexdigest() for n, b in files.items() if n != SIGNATURE_NAME
    }
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"


def test_sign_export_returns_what_it_wrote(tmp_path: Path, key: key_files.SigningKeyFile) -> None:
    written = make_export(tmp_path / "export", key)
    data = (tmp_path / "export" / MANIFEST_NAME).read_bytes()
    assert data == written.to_bytes()
    assert parse_manifest(data) == written
    assert verify_export_files(read_export(tmp_path / "export")) == written


def test_verify_export_files_does_no_file_io(export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = read_export(export)

    def no_io(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"verification touched the file system: {args[:1]}")

    for name in ("open", "mkdir", "unlink", "rename", "replace", "scandir", "listdir"):
        monkeypatch.setattr(os, name, no_io)
    monkeypatch.setattr("builtins.open", no_io)
    assert verify_export_files(files).name == "python-stdlib"


def test_manifest_bytes_are_deterministic_sorted_compact(export: Path) -> None:
    data = (export / MANIFEST_NAME).read_bytes()
    keys = list(json.loads(data))
    assert keys == sorted(keys)
    assert b" " not in data and b"\n" not in data
    assert parse_manifest(data).to_bytes() == data


def test_alpha_is_the_only_float_and_int_alpha_accepted(
    tmp_path: Path, key: key_files.SigningKeyFile
) -> None:
    manifest = make_export(tmp_path / "export", key, alpha=16)
    assert manifest.alpha == 16.0 and isinstance(manifest.alpha, float)
    obj = json.loads(manifest.to_bytes())
    floats = [k for k, v in obj.items() if isinstance(v, float)]
    assert floats == ["alpha"]


def test_resigning_replaces_manifest_without_leftovers(
    export: Path, key: key_files.SigningKeyFile
) -> None:
    later = CREATED + timedelta(seconds=1)
    make_export(export, key, created=later)
    assert verify_export_files(read_export(export)).created == later
    assert sorted(p.name for p in export.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "norm_stats.json"]
        + [MANIFEST_NAME, SIGNATURE_NAME]
    )


def test_manifest_hash_names_exact_bytes(export: Path) -> None:
    data = (export / MANIFEST_NAME).read_bytes()
    assert manifest_sha256(data) != manifest_sha256(data + b" ")
    assert len(manifest_sha256(data)) == 64


def test_non_utc_aware_time_is_stored_as_utc(tmp_path: Path, key: key_files.SigningKeyFile) -> None:
    plus_two = datetime(2025, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    manifest = make_export(tmp_path / "export", key, created=plus_two)
    assert manifest.created_iso == "2025-06-01T12:00:00.000000Z"


# --- tampering ----------------------------------------------------------------------------


def test_tampered_weights_rejected(export: Path) -> None:
    weights = bytearray((export / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (export / "adapter_model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(SignatureError, match="adapter_model.safetensors has sha256"):
        verify_export_files(read_export(export))


def test_tampered_stats_rejected(export: Path) -> None:
    (export / "norm_stats.json").write_bytes(b"{}")
    with pytest.raises(SignatureError, match="norm_stats.json"):
        verify_export_files(read_export(export))


def test_forged_manifest_rejected(export: Path) -> None:
    obj = _manifest_dict(export)
    obj["name"] = "someone-else"
    (export / MANIFEST_NAME).write_bytes(json.dumps(obj, sort_keys=True).encode())
    with pytest.raises(SignatureError, match="manifest.json has sha256"):
        verify_export_files(read_export(export))


def test_swapped_public_key_rejected(export: Path) -> None:
    obj = _manifest_dict(export)
    other = signing.public_key_bytes(signing.generate_private_key()).hex()
    obj["public_key"] = other
    (export / MANIFEST_NAME).write_bytes(json.dumps(obj, sort_keys=True).encode())
    with pytest.raises(SignatureError, match="made by another key"):
        verify_export_files(read_export(export))


def test_reformatted_manifest_rejected(export: Path) -> None:
    # Same JSON value, different bytes: the signature covers bytes, not meaning.
    obj = _manifest_dict(export)
    (export / MANIFEST_NAME).write_bytes(json.dumps(obj, indent=2, sort_keys=True).encode())
    with pytest.raises(SignatureError):
        verify_export_files(read_export(export))


def test_unsigned_extra_file_rejected(export: Path) -> None:
    (export / "backdoor.bin").write_bytes(b"\x00")
    with pytest.raises(SignatureError, match="not signed \\['backdoor.bin'\\]"):
        verify_export_files(read_export(export))


def test_missing_listed_file_rejected(export: Path) -> None:
    (export / "norm_stats.json").unlink()
    with pytest.raises(SignatureError, match="missing \\['norm_stats.json'\\]"):
        verify_export_files(read_export(export))


@pytest.mark.parametrize("name", [MANIFEST_NAME, SIGNATURE_NAME])
def test_missing_manifest_or_signature_rejected(export: Path, name: str) -> None:
    (export / name).unlink()
    with pytest.raises(FormatError, match=f"no {name}"):
        verify_export_files(read_export(export))


def test_truncated_bundle_rejected(export: Path) -> None:
    (export / SIGNATURE_NAME).write_bytes((export / SIGNATURE_NAME).read_bytes()[:-10])
    with pytest.raises(FormatError, match="model.sig is not valid JSON"):
        verify_export_files(read_export(export))


def test_oversized_bundle_rejected_before_parsing(export: Path) -> None:
    files = read_export(export)
    files[SIGNATURE_NAME] = b"[" * (MAX_BUNDLE_BYTES + 1)
    with pytest.raises(FormatError, match="model.sig is .* bytes, over"):
        verify_export_files(files)


def test_oversized_export_rejected_before_hashing(export: Path) -> None:
    files = read_export(export)
    with pytest.raises(FormatError, match="over the limit"):
        verify_export_files(files, max_total_bytes=100)


def test_path_traversal_name_rejected(export: Path) -> None:
    files = read_export(export)
    files["../evil"] = b"x"
    with pytest.raises(FormatError, match="not allowed"):
        verify_export_files(files)


# --- strict parsing -----------------------------------------------------------------------


def _ed25519_identity_hex() -> str:
    point = ed25519.Ed25519PublicKey.from_public_bytes(bytes([1]) + bytes(31))
    return point.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ).hex()


def _good(export: Path) -> dict[str, Any]:
    return _manifest_dict(export)


def _parse(obj: Any) -> Manifest:
    return parse_manifest(json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(extra=1), "unknown \\['extra'\\]"),
        (lambda d: d.pop("rank"), "missing \\['rank'\\]"),
        (lambda d: d.update(rank="2"), "rank must be int"),
        (lambda d: d.update(rank=True), "rank must be int"),
        (lambda d: d.update(rank=0), "rank = 0 must be in"),
        (lambda d: d.update(alpha="4.0"), "alpha must be float"),
        (lambda d: d.update(alpha=0), "alpha = 0 must be finite and > 0"),
        (lambda d: d.update(a_seed=-1), "a_seed = -1"),
        (lambda d: d.update(example_count=0), "example_count = 0"),
        (lambda d: d.update(format_version=3), "format_version 3 is not 2"),
        (lambda d: d.update(format_version=1), "format 1 was signed by manifest.sig; re-export"),
        (lambda d: d.update(files={}), "unknown \\['files'\\]"),
        (lambda d: d.update(target_modules=["v_proj", "q_proj"]), "sorted"),
        (lambda d: d.update(target_modules=["q_proj", "q_proj"]), "duplicates"),
        (lambda d: d.update(target_modules=[]), "at least one"),
        (lambda d: d.update(target_modules=["q proj"]), "not a module name"),
        (lambda d: d.update(base_model_sha256="AB" * 32), "base_model_sha256"),
        (lambda d: d.update(a_sha256="00" * 31), "a_sha256"),
        (lambda d: d.update(public_key="00" * 33), "public_key"),
        (lambda d: d.update(public_key="00" * 91), "public_key is not a valid public key"),
        (lambda d: d.update(public_key=d["public_key"].upper()), "lowercase"),
        (lambda d: d.update(public_key=d["public_key"][:-2]), "public_key"),
        (lambda d: d.update(public_key=_ed25519_identity_hex()), "Ed25519 key"),
        (lambda d: d.update(created="2025-06-01 12:00:00"), "ISO-8601 UTC"),
        (lambda d: d.update(created="2025-06-01T12:00:00+02:00"), "ISO-8601 UTC"),
        (lambda d: d.update(created="2025-13-01T12:00:00Z"), "created"),
        (lambda d: d.update(name=""), "name"),
        (lambda d: d.update(name="../etc"), "name"),
    ],
)
def test_malformed_manifest_rejected(export: Path, change: Any, match: str) -> None:
    obj = _good(export)
    change(obj)
    with pytest.raises(FormatError, match=match):
        _parse(obj)


def test_duplicate_key_manifest_rejected(export: Path) -> None:
    data = (export / MANIFEST_NAME).read_bytes()
    forged = data[:-1] + b',"name":"other"}'
    with pytest.raises(FormatError, match="duplicate key 'name'"):
        parse_manifest(forged)


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"1e400"])
def test_non_finite_alpha_rejected(export: Path, number: bytes) -> None:
    data = (export / MANIFEST_NAME).read_bytes()
    alpha = json.dumps(_good(export)["alpha"]).encode()
    forged = data.replace(b'"alpha":' + alpha, b'"alpha":' + number)
    assert forged != data
    with pytest.raises(FormatError):
        parse_manifest(forged)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"[]", "must be a JSON object"),
        (b"\xff\xfe", "UTF-8"),
        (b"{", "not valid JSON"),
        (b" " * (MAX_MANIFEST_BYTES + 1), "over the limit"),
        (b"[" * 100_000 + b"]" * 100_000, "over the limit|nested|JSON"),
    ],
)
def test_garbage_manifest_rejected(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse_manifest(data)


def test_naive_created_time_rejected(tmp_path: Path, key: key_files.SigningKeyFile) -> None:
    with pytest.raises(FormatError, match="timezone-aware"):
        make_export(tmp_path / "export", key, created=datetime(2025, 1, 1))
    assert not (tmp_path / "export" / MANIFEST_NAME).exists()


def test_sign_export_rejects_bad_hash_argument(
    tmp_path: Path, key: key_files.SigningKeyFile
) -> None:
    with pytest.raises(FormatError, match="base_model_sha256"):
        make_export(tmp_path / "export", key, base_model_sha256="not-a-hash")


# --- reading export folders ---------------------------------------------------------------


def test_symlink_in_export_rejected(export: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (export / "link.txt").symlink_to(secret)
    with pytest.raises(FormatError, match="not a regular file"):
        read_export(export)


def test_subfolder_in_export_rejected(export: Path) -> None:
    (export / "nested").mkdir()
    with pytest.raises(FormatError, match="not a regular file"):
        read_export(export)


def test_hidden_leftover_file_rejected(export: Path) -> None:
    (export / ".manifest.json.123.tmp").write_bytes(b"x")
    with pytest.raises(FormatError, match="not allowed"):
        read_export(export)


def test_read_export_stops_at_byte_budget(export: Path) -> None:
    with pytest.raises(FormatError, match="over the limit of 200 bytes"):
        read_export(export, max_total_bytes=200)


def test_read_export_caps_file_count(export: Path) -> None:
    for i in range(3):
        (export / f"f{i}").write_bytes(b"")
    with pytest.raises(FormatError, match="entries, over the limit of 6"):
        read_export(export, max_files=6)


def test_missing_export_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="does not exist"):
        read_export(tmp_path / "nope")


def test_sign_export_refuses_symlinked_payload(
    tmp_path: Path, key: key_files.SigningKeyFile
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (tmp_path / "real.json").write_text("{}")
    (folder / "adapter_config.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(FormatError, match="not a regular file"):
        sign_export(
            folder,
            key,
            name="x",
            base_model_sha256=BASE_SHA,
            a_seed=0,
            a_sha256=A_SHA,
            rank=2,
            alpha=4.0,
            target_modules=["q_proj"],
            example_count=1,
            created=datetime.now(UTC),
        )
    assert not (folder / MANIFEST_NAME).exists() and not (folder / SIGNATURE_NAME).exists()
