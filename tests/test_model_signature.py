"""Attacks on an export's model-signing bundle (model.sig), verified in memory.

Each test builds a real export (bundle made by model-signing with a real P-256 key file), then
mounts one attack on the bundle and asserts the exact refusal and that nothing on disk changed.
Bundles re-signed by hand (``_signed_bundle``) play an attacker who holds the key: they carry
a valid signature over a statement that breaks one rule.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _signed_export import make_export, make_key
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from seqr.core import key_files, signing
from seqr.core.errors import FormatError, SignatureError
from seqr.core.manifest import SIGNATURE_NAME, read_export, verify_export_files
from seqr.core.model_signature import (
    PAYLOAD_TYPE,
    sign_files,
    verify_bundle,
)


@pytest.fixture
def key(tmp_path: Path) -> key_files.SigningKeyFile:
    return make_key(tmp_path / "key")


@pytest.fixture
def export(tmp_path: Path, key: key_files.SigningKeyFile) -> Path:
    make_export(tmp_path / "export", key)
    return tmp_path / "export"


def _bundle(folder: Path) -> dict[str, Any]:
    return json.loads((folder / SIGNATURE_NAME).read_bytes())


def _statement(bundle: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def _signed_bundle(
    bundle: dict[str, Any], statement: dict[str, Any], key: key_files.SigningKeyFile
) -> bytes:
    """``bundle`` carrying ``statement``, validly signed by ``key`` (DSSE PAE, ECDSA-SHA256)."""
    out = copy.deepcopy(bundle)
    payload = json.dumps(statement).encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)
    sig = key.key.sign(pae, ec.ECDSA(hashes.SHA256()))
    out["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    out["dsseEnvelope"]["signatures"] = [{"sig": base64.b64encode(sig).decode(), "keyid": ""}]
    return json.dumps(out).encode()


def _root(resources: list[dict[str, str]]) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in resources)).hexdigest()


def _refused(export: Path, bundle: bytes, error: type[Exception], match: str) -> None:
    """Verification of the export with ``bundle`` fails as expected; the folder is untouched."""
    before = read_export(export)
    files = dict(before)
    files[SIGNATURE_NAME] = bundle
    with pytest.raises(error, match=match):
        verify_export_files(files)
    assert read_export(export) == before


def test_bundle_names_exactly_the_signed_files(export: Path, key: key_files.SigningKeyFile) -> None:
    files = read_export(export)
    signed = verify_bundle(files[SIGNATURE_NAME], key.public)
    assert dict(signed) == {
        n: hashlib.sha256(b).hexdigest() for n, b in files.items() if n != SIGNATURE_NAME
    }


def test_library_verifier_accepts_a_seqr_export(
    export: Path, key: key_files.SigningKeyFile
) -> None:
    """Parity: model-signing's own Python verifier accepts what seqr writes."""
    from model_signing import verifying

    public = key.path.parent / signing.PUBLIC_KEY_NAME
    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(
        export, export / SIGNATURE_NAME
    )


def test_sign_files_bundle_verifies_in_memory(key: key_files.SigningKeyFile) -> None:
    files = {"a.bin": b"\x00\x01", "manifest.json": b"{}"}
    bundle = sign_files(files, key, name="group-x")
    assert dict(verify_bundle(bundle, key.public)) == {
        n: hashlib.sha256(b).hexdigest() for n, b in files.items()
    }
    assert _statement(json.loads(bundle))["subject"][0]["name"] == "group-x"


# --- swapped bundles ------------------------------------------------------------------------


def test_swapped_bundle_from_another_export_by_the_same_key_rejected(
    tmp_path: Path, export: Path, key: key_files.SigningKeyFile
) -> None:
    other = tmp_path / "other"
    make_export(other, key, tensors=None, name="other-adapter")
    _refused(export, (other / SIGNATURE_NAME).read_bytes(), SignatureError, "has sha256")


def test_swapped_bundle_by_another_key_over_the_same_files_rejected(
    tmp_path: Path, export: Path
) -> None:
    """An attacker re-signs the victim's exact files with his key: the manifest names hers."""
    attacker = make_key(tmp_path / "attacker")
    files = {n: b for n, b in read_export(export).items() if n != SIGNATURE_NAME}
    _refused(export, sign_files(files, attacker, name="export"), SignatureError, "another key")


def test_bundle_with_hint_forged_to_the_victims_key_rejected(
    tmp_path: Path, export: Path, key: key_files.SigningKeyFile
) -> None:
    attacker = make_key(tmp_path / "attacker")
    bundle = _bundle(export)
    forged = json.loads(_signed_bundle(bundle, _statement(bundle), attacker))
    forged["verificationMaterial"]["publicKey"]["hint"] = hashlib.sha256(
        signing.public_key_pem(key.public)
    ).hexdigest()
    _refused(export, json.dumps(forged).encode(), SignatureError, "does not verify with key")


def test_statement_changed_under_the_signature_rejected(export: Path) -> None:
    bundle = _bundle(export)
    statement = _statement(bundle)
    statement["predicate"]["resources"][0]["digest"] = "00" * 32
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    _refused(export, json.dumps(bundle).encode(), SignatureError, "does not verify")


# --- statements that would hide or misname files (validly signed) --------------------------


def test_statement_ignoring_a_payload_file_rejected(
    export: Path, key: key_files.SigningKeyFile
) -> None:
    """The CLI ignores what the signed statement says to ignore: a signer could leave the
    statistics unsigned and let anyone change them. seqr refuses such a statement."""
    bundle = _bundle(export)
    statement = _statement(bundle)
    resources = [r for r in statement["predicate"]["resources"] if r["name"] != "norm_stats.json"]
    statement["predicate"]["resources"] = resources
    statement["predicate"]["serialization"]["ignore_paths"] = ["model.sig", "norm_stats.json"]
    statement["subject"][0]["digest"]["sha256"] = _root(resources)
    _refused(export, _signed_bundle(bundle, statement, key), FormatError, "may ignore only")


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return change


def _drop_resource(s: dict[str, Any]) -> None:
    s["predicate"]["resources"] = s["predicate"]["resources"][1:]
    s["subject"][0]["digest"]["sha256"] = _root(s["predicate"]["resources"])


def _extra_resource(s: dict[str, Any]) -> None:
    s["predicate"]["resources"].append(
        {"name": "backdoor.bin", "algorithm": "sha256", "digest": "11" * 32}
    )
    s["subject"][0]["digest"]["sha256"] = _root(s["predicate"]["resources"])


def _duplicate_resource(s: dict[str, Any]) -> None:
    s["predicate"]["resources"].append(dict(s["predicate"]["resources"][0]))
    s["subject"][0]["digest"]["sha256"] = _root(s["predicate"]["resources"])


def _root_not_updated(s: dict[str, Any]) -> None:
    s["predicate"]["resources"] = s["predicate"]["resources"][1:]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (_drop_resource, SignatureError, "not signed \\['adapter_config.json'\\]"),
        (_extra_resource, SignatureError, "missing \\['backdoor.bin'\\]"),
        (_duplicate_resource, FormatError, "listed once"),
        (_root_not_updated, FormatError, "subject digest"),
        (
            lambda s: s.update(predicateType="https://model_signing/Digests/v0.1"),
            FormatError,
            "predicateType",
        ),  # fmt: skip
        (lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"), FormatError, "_type"),
        (
            lambda s: s["predicate"]["serialization"].update(allow_symlinks=True),
            FormatError,
            "symlinks",
        ),  # fmt: skip
        (
            lambda s: s["predicate"]["serialization"].update(method="shards"),
            FormatError,
            "default",
        ),  # fmt: skip
        (
            lambda s: s["predicate"]["serialization"].update(hash_type="blake2"),
            FormatError,
            "default",
        ),  # fmt: skip
        (lambda s: s["predicate"]["resources"][0].update(algorithm="md5"), FormatError, "sha256"),
        (lambda s: s["subject"].append(dict(s["subject"][0])), FormatError, "one subject"),
        (lambda s: s["predicate"].update(extra={"x": 1}), FormatError, "unknown \\['extra'\\]"),
    ],
)
def test_validly_signed_but_malformed_statement_rejected(
    export: Path,
    key: key_files.SigningKeyFile,
    change: Callable[[dict[str, Any]], None],
    error: type[Exception],
    match: str,
) -> None:
    bundle = _bundle(export)
    statement = _statement(bundle)
    change(statement)
    _refused(export, _signed_bundle(bundle, statement, key), error, match)


# --- the bundle's own format --------------------------------------------------------------


def _with(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], bytes]:
    def make(export: Path) -> bytes:
        bundle = _bundle(export)
        change(bundle)
        return json.dumps(bundle).encode()

    return make


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (_with(lambda b: b.update(mediaType="application/json")), "mediaType"),
        (_with(lambda b: b["dsseEnvelope"].update(payloadType="text/plain")), "payloadType"),
        (_with(lambda b: b["dsseEnvelope"].update(signatures=[])), "exactly one signature"),
        (
            _with(
                lambda b: b["dsseEnvelope"]["signatures"].append(b["dsseEnvelope"]["signatures"][0])
            ),
            "exactly one signature",
        ),
        (_with(lambda b: b["verificationMaterial"].update(tlogEntries=[{}])), "tlogEntries"),
        (_with(lambda b: b["dsseEnvelope"].update(payload="not base64!")), "base64"),
        (_with(lambda b: b["dsseEnvelope"]["signatures"][0].update(sig="QQ" * 100)), "base64"),
        (_with(lambda b: b.pop("verificationMaterial")), "missing \\['verificationMaterial'\\]"),
        (lambda e: (e / SIGNATURE_NAME).read_bytes()[:-1] + b',"mediaType":"x"}', "duplicate key"),
        (lambda e: b'{"mediaType": NaN}', "NaN"),
        (lambda e: b"[" * 30_000 + b"]" * 30_000, "nested .* deep"),
        (lambda e: b"\xff\xfe", "UTF-8"),
    ],
)
def test_malformed_bundle_rejected(export: Path, make: Callable[[Path], bytes], match: str) -> None:
    _refused(export, make(export), FormatError, match)


def test_bundle_with_hint_of_another_key_rejected(export: Path) -> None:
    bundle = _bundle(export)
    bundle["verificationMaterial"]["publicKey"]["hint"] = "00" * 32
    _refused(export, json.dumps(bundle).encode(), SignatureError, "another key")
