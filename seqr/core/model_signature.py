"""OpenSSF model-signing bundles over an export folder: signed by the library, verified as bytes.

The signature of an export is ``model.sig`` inside the folder: a Sigstore bundle (media type
v0.3) holding a DSSE envelope whose payload is an in-toto Statement v1 with predicate
``https://model_signing/signature/v1.0``: the SHA-256 of every other file of the folder. It is
what ``model_signing sign key DIR --signature DIR/model.sig --private_key signing_key.pem``
makes, and anyone checks it with the standard tool:

    model_signing verify key DIR --signature DIR/model.sig --public_key signing_key.pub

Signing goes through model-signing's public Python API (``signing.Config()
.use_elliptic_key_signer``) with its default hashing (one SHA-256 per file, git files ignored)
and the bundle's own name ignored, as the CLI does when the signature lies inside the folder.

Verification (``verify_bundle``) is pure over bytes and written here, because model-signing
verifies only paths on disk and reads bundles with plain ``json.loads``; admission must check
received bytes in memory, under a byte cap and with the strict parser. It makes the checks the
library's key verifier makes (sign_ec_key.Verifier, signing.dsse_payload_to_manifest, verifying
.Config.verify) and a few more: exactly one signature, no compat (pre-1.0) payload, nothing
ignored but the bundle itself and git files, and every name and digest listed exactly once.
tests/test_model_signing_cli.py checks that the real CLI accepts and refuses the same folders.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from seqr.core import key_files, signing
from seqr.core.errors import FormatError, KeyFileError, SignatureError
from seqr.core.export_folder import check_file_name, read_export
from seqr.core.strict_json import loads_strict

__all__ = [
    "BUNDLE_NAME",
    "MAX_BUNDLE_BYTES",
    "sign_folder",
    "sign_files",
    "verify_files",
    "verify_bundle",
    "check_signed_names",
    "check_signed_digests",
]

BUNDLE_NAME = "model.sig"
MAX_BUNDLE_BYTES = 64 * 1024  # bytes; a bundle over a handful of files is ~3 KB
MAX_SIGNED_FILES = 64  # resources one statement may list
MAX_DER_SIGNATURE_BYTES = 80  # an ECDSA P-256 DER signature is at most 72 bytes

# The formats model-signing 1.x writes (model_signing/_signing/*.py, in-toto attestation v1).
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# What model-signing's default hashing leaves out of a folder (hashing.Config.hash), plus the
# bundle itself: anything else a statement asks verifiers to ignore is refused.
IGNORABLE = frozenset({".git", ".github", ".gitignore", ".gitattributes", BUNDLE_NAME})

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def sign_folder(folder: Path, key: key_files.SigningKeyFile) -> bytes:
    """Sign every file of ``folder`` with ``key`` into ``folder/model.sig``; return its bytes.

    The bundle is read back and verified against the folder's files and the key's public half
    before it is returned (verify before use): a key file that changed since it was checked, or
    a file that changed while it was hashed, fails here. The folder's files are the caller's:
    read with limits (seqr.core.export_folder.read_export) before this is called.
    """
    from model_signing import hashing  # slow import (sigstore)
    from model_signing import signing as ms_signing

    folder = Path(folder)
    hashing_config = hashing.Config().set_ignored_paths(paths=[BUNDLE_NAME])
    try:
        # password: the library hints str but passes it to cryptography's
        # load_pem_private_key, which takes bytes.
        config = ms_signing.Config().use_elliptic_key_signer(
            private_key=key.path, password=cast(Any, key.passphrase)
        )
        config.set_hashing_config(hashing_config).sign(folder, folder / BUNDLE_NAME)
    except (ValueError, TypeError, OSError) as exc:
        raise SignatureError(
            f"model-signing could not sign {folder} with {key.path}: {type(exc).__name__}"
        ) from None
    files = read_export(folder)
    verify_files(files, key.public)
    return files[BUNDLE_NAME]


def sign_files(
    files: Mapping[str, bytes], key: key_files.SigningKeyFile, *, name: str = "adapter"
) -> bytes:
    """The bundle over ``files`` (name -> bytes), signed as the folder ``name`` holding them.

    The files are written to a private temporary folder only because the library signs folders;
    they are public data (an export being published), the key never leaves its file.
    """
    check_file_name(name, where="signed folder name")
    with tempfile.TemporaryDirectory(prefix="seqr-sign-") as tmp:
        folder = Path(tmp) / name
        folder.mkdir(mode=0o700)
        for file_name, data in files.items():
            check_file_name(file_name)
            if file_name == BUNDLE_NAME:
                raise FormatError(f"{BUNDLE_NAME} is the signature; it cannot be signed")
            (folder / file_name).write_bytes(bytes(data))
        bundle = sign_folder(folder, key)
    return bundle


def verify_files(files: Mapping[str, bytes], public: bytes) -> Mapping[str, str]:
    """``verify_bundle`` on ``files[model.sig]``, then names and digests of all other files."""
    if BUNDLE_NAME not in files:
        raise FormatError(f"export has no {BUNDLE_NAME}; sign it with seqr or model_signing")
    signed = verify_bundle(files[BUNDLE_NAME], public)
    check_signed_names(signed, files)
    check_signed_digests(signed, files)
    return signed


def verify_bundle(bundle: bytes, public: bytes) -> Mapping[str, str]:
    """Verify a model-signing bundle with the DER public key ``public``; no I/O.

    Returns what it signs: file name -> SHA-256 hex. FormatError for a bundle that is not in
    the format above (too big, not strict JSON, other types, fields or counts); SignatureError
    for a signature that does not verify with this key, or a key hint naming another key.
    """
    obj = loads_strict(bundle, what=BUNDLE_NAME, max_bytes=MAX_BUNDLE_BYTES)
    _keys(obj, {"mediaType", "verificationMaterial", "dsseEnvelope"}, "bundle")
    if obj["mediaType"] != BUNDLE_MEDIA_TYPE:
        _bad(f"mediaType is {obj['mediaType']!r:.80}, expected {BUNDLE_MEDIA_TYPE!r}")
    material = obj["verificationMaterial"]
    _keys(material, {"publicKey"}, "verificationMaterial", optional={"tlogEntries"})
    if material.get("tlogEntries", []) != []:
        _bad("verificationMaterial.tlogEntries must be empty for a key signature")
    _keys(material["publicKey"], {"hint"}, "verificationMaterial.publicKey")
    try:
        key = signing.check_public_key(public)
    except KeyFileError as exc:
        raise SignatureError(f"cannot verify {BUNDLE_NAME}: {exc}") from None
    # sign_ec_key: the hint is SHA-256 of the signer's PEM public key; the CLI refuses others.
    hint = hashlib.sha256(signing.public_key_pem(public)).hexdigest()
    if material["publicKey"]["hint"] != hint:
        raise SignatureError(
            f"{BUNDLE_NAME} was made by another key than {signing.fingerprint(public)} "
            "(its public-key hint differs): the signature was swapped or the key is wrong"
        )
    envelope = obj["dsseEnvelope"]
    _keys(envelope, {"payload", "payloadType", "signatures"}, "dsseEnvelope")
    if envelope["payloadType"] != PAYLOAD_TYPE:
        _bad(f"payloadType is {envelope['payloadType']!r:.80}, expected {PAYLOAD_TYPE!r}")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        _bad("dsseEnvelope.signatures must hold exactly one signature")
    _keys(signatures[0], {"sig"}, "dsseEnvelope.signatures[0]", optional={"keyid"})
    payload = _base64(envelope["payload"], "dsseEnvelope.payload", MAX_BUNDLE_BYTES)
    signature = _base64(signatures[0]["sig"], "signature", MAX_DER_SIGNATURE_BYTES)
    try:
        # DSSE v1 PAE over the payload (secure-systems-lab/dsse protocol.md), ECDSA-SHA256.
        key.verify(signature, _pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(
            f"{BUNDLE_NAME} does not verify with key {signing.fingerprint(public)}: the "
            "signed statement was changed or signed by another key"
        ) from None
    return _statement_files(payload)


def check_signed_names(signed: Mapping[str, str], files: Mapping[str, bytes]) -> None:
    """The statement lists exactly the folder's files, the bundle aside (SignatureError)."""
    present = set(files) - {BUNDLE_NAME}
    missing, unsigned = set(signed) - present, present - set(signed)
    if missing or unsigned:
        raise SignatureError(
            f"files differ from the signed statement: missing {_names(missing)}, "
            f"not signed {_names(unsigned)}"
        )


def check_signed_digests(signed: Mapping[str, str], files: Mapping[str, bytes]) -> None:
    """Every signed file's bytes hash to the signed SHA-256 (SignatureError naming the file)."""
    for name, expected in sorted(signed.items()):
        actual = hashlib.sha256(files[name]).hexdigest()
        if actual != expected:
            raise SignatureError(
                f"{name} has sha256 {actual[:16]}... but the signature covers "
                f"{expected[:16]}...: the file was changed after signing"
            )


def _statement_files(payload: bytes) -> Mapping[str, str]:
    """The in-toto statement's resources, checked as signing.dsse_payload_to_manifest does."""
    obj = loads_strict(payload, what="signed statement", max_bytes=MAX_BUNDLE_BYTES)
    _keys(obj, {"_type", "subject", "predicateType", "predicate"}, "statement")
    if obj["_type"] != STATEMENT_TYPE:
        _bad(f"statement _type is {obj['_type']!r:.80}, expected {STATEMENT_TYPE!r}")
    if obj["predicateType"] != PREDICATE_TYPE:
        _bad(f"predicateType is {obj['predicateType']!r:.80}, expected {PREDICATE_TYPE!r}")
    subjects = obj["subject"]
    if not isinstance(subjects, list) or len(subjects) != 1:
        _bad("statement must have exactly one subject")
    _keys(subjects[0], {"name", "digest"}, "subject")
    _keys(subjects[0]["digest"], {"sha256"}, "subject.digest")
    root = _hex(subjects[0]["digest"]["sha256"], "subject digest")
    predicate = obj["predicate"]
    _keys(predicate, {"serialization", "resources"}, "predicate")
    serialization = predicate["serialization"]
    required = {"method", "hash_type", "allow_symlinks"}
    _keys(serialization, required, "serialization", optional={"ignore_paths"})
    if (serialization["method"], serialization["hash_type"]) != ("files", "sha256"):
        _bad("serialization must be model-signing's default: method files, hash_type sha256")
    if serialization["allow_symlinks"] is not False:
        _bad("serialization must not allow symlinks")
    ignored = serialization.get("ignore_paths", [])
    if not isinstance(ignored, list) or not set(ignored) <= IGNORABLE:
        _bad(f"statement may ignore only {sorted(IGNORABLE)}; it would hide other files")
    resources = predicate["resources"]
    if not isinstance(resources, list) or not 0 < len(resources) <= MAX_SIGNED_FILES:
        _bad(f"statement must list 1 to {MAX_SIGNED_FILES} resources")
    out: dict[str, str] = {}
    root_hasher = hashlib.sha256()
    for i, resource in enumerate(resources):
        _keys(resource, {"name", "algorithm", "digest"}, f"resources[{i}]")
        name, digest = resource["name"], _hex(resource["digest"], f"resources[{i}].digest")
        if resource["algorithm"] != "sha256" or not isinstance(name, str) or name in out:
            _bad(f"resources[{i}] must be a sha256 digest of a file listed once")
        root_hasher.update(bytes.fromhex(digest))
        out[name] = digest
    if root_hasher.hexdigest() != root:  # the subject digest commits to every resource
        _bad("subject digest is not the SHA-256 of the listed digests")
    return MappingProxyType(out)


def _names(names: set[str]) -> list[str]:
    # Names from another party, shown escaped (repr) and bounded in length and number.
    return [str(n)[:64] for n in sorted(names)[:8]]


def _pae(payload: bytes) -> bytes:
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


def _keys(obj: Any, required: set[str], what: str, *, optional: set[str] | None = None) -> None:
    if not isinstance(obj, dict):
        _bad(f"{what} must be a JSON object")
    missing, unknown = required - set(obj), set(obj) - required - (optional or set())
    if missing or unknown:
        shown = sorted(str(k)[:40] for k in unknown)[:5]
        _bad(f"{what} keys are wrong: missing {sorted(missing)}, unknown {shown}")


def _base64(value: Any, what: str, max_bytes: int) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * (max_bytes // 3 + 1):
        _bad(f"{what} must be base64 of at most {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        _bad(f"{what} is not valid base64")


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_HEX.match(value):
        _bad(f"{what} must be 64 lowercase hex digits (sha256)")
    return value


def _bad(why: str) -> NoReturn:
    raise FormatError(f"{BUNDLE_NAME}: {why}")
