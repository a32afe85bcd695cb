"""The signed manifest of a client's adapter export.

An export folder holds the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``),
its calibration statistics (``norm_stats.json``), ``manifest.json`` and ``manifest.sig``: the raw
64-byte Ed25519 signature over the EXACT bytes of manifest.json. The manifest lists the SHA-256
of every other file, so one signature covers the whole folder (TUF targets metadata: hashes and
lengths of files, TUF spec 1.0 section 4.5). Verification never re-serialises anything: it
checks the signature over the bytes as received, then each file's bytes against its hash.

manifest.json is written with sorted keys and no whitespace. ``alpha`` is its only float: a
JSON number (written with Python's shortest round-trip repr, e.g. ``16.0``); because signatures
cover exact bytes, no canonical float form is needed (DSSE's approach, SECURITY.md).
``created`` is ISO-8601 UTC with a ``Z`` suffix, e.g. ``2025-01-02T03:04:05.000006Z``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from seqr.core import signing
from seqr.core.atomic_write import write_atomic
from seqr.core.errors import FormatError, KeyFileError, SignatureError
from seqr.core.export_folder import (
    DEFAULT_MAX_EXPORT_BYTES,
    MAX_EXPORT_FILES,
    check_file_name,
    read_export,
)
from seqr.core.strict_json import loads_strict

__all__ = [
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "NORM_STATS_NAME",
    "EXPORT_PAYLOAD_NAMES",
    "Manifest",
    "parse_manifest",
    "manifest_sha256",
    "sign_export",
    "verify_manifest_signature",
    "check_export_files",
    "verify_export_files",
    "read_export",
]

MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
NORM_STATS_NAME = "norm_stats.json"
# The files a complete adapter export holds besides the manifest and its signature.
EXPORT_PAYLOAD_NAMES = frozenset({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, NORM_STATS_NAME})

MAX_MANIFEST_BYTES = 64 * 1024  # bytes; a manifest is ~1 KB
MAX_NAME_CHARS = 128
MAX_RANK = 4096
MAX_INT64 = 2**63 - 1

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,255}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CREATED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
_FIELDS = {
    "format_version": int,
    "files": dict,
    "base_model_sha256": str,
    "a_seed": int,
    "a_sha256": str,
    "rank": int,
    "alpha": float,
    "target_modules": list,
    "public_key": str,
    "created": str,
    "name": str,
    "example_count": int,
}


@dataclass(frozen=True)
class Manifest:
    """What a client signs about one adapter export; validates every field on construction."""

    files: Mapping[str, str]  # file name -> sha256 hex of its exact bytes
    base_model_sha256: str
    a_seed: int  # public seed of the shared frozen A
    a_sha256: str  # hash of the shared A matrices
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # sorted, unique
    public_key: str  # 64 hex chars: the 32 raw Ed25519 bytes that sign this manifest
    created: datetime  # timezone-aware, UTC
    name: str  # adapter / domain label
    example_count: int  # training examples the adapter saw
    format_version: int = field(default=MANIFEST_FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.format_version != MANIFEST_FORMAT_VERSION:
            _bad("format_version", self.format_version, f"must be {MANIFEST_FORMAT_VERSION}")
        files = dict(self.files)
        if not files:
            _bad("files", files, "must list at least one file")
        for name, digest in files.items():
            check_file_name(name)
            if name in (MANIFEST_NAME, SIGNATURE_NAME):
                _bad("files", name, "cannot list the manifest or its signature")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                _bad(f"files[{name!r}]", digest, "must be 64 lowercase hex digits (sha256)")
        object.__setattr__(self, "files", MappingProxyType(dict(sorted(files.items()))))
        for key in ("base_model_sha256", "a_sha256"):
            value = getattr(self, key)
            if not isinstance(value, str) or not _SHA256.match(value):
                _bad(key, value, "must be 64 lowercase hex digits (sha256)")
        _check_int("a_seed", self.a_seed, 0, MAX_INT64)
        _check_int("rank", self.rank, 1, MAX_RANK)
        _check_int("example_count", self.example_count, 1, MAX_INT64)
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            _bad("alpha", alpha, "must be a number")
        if not (math.isfinite(alpha) and alpha > 0):
            _bad("alpha", alpha, "must be finite and > 0")
        object.__setattr__(self, "alpha", float(alpha))
        modules = tuple(self.target_modules)
        if not modules:
            _bad("target_modules", modules, "must name at least one module")
        for module in modules:
            if not isinstance(module, str) or not _MODULE.match(module):
                _bad("target_modules", module, "is not a module name like q_proj")
        if list(modules) != sorted(set(modules)):
            _bad("target_modules", list(modules), "must be sorted and without duplicates")
        object.__setattr__(self, "target_modules", modules)
        if not isinstance(self.public_key, str) or self.public_key != self.public_key.lower():
            _bad("public_key", self.public_key, "must be lowercase hex")
        try:
            signing.load_public_key_hex(self.public_key)
        except KeyFileError as exc:
            raise FormatError(f"manifest field public_key: {exc}") from None
        if not isinstance(self.created, datetime) or self.created.utcoffset() is None:
            _bad("created", self.created, "must be a timezone-aware datetime (e.g. tz=UTC)")
        object.__setattr__(self, "created", self.created.astimezone(UTC))
        if not isinstance(self.name, str) or not _LABEL.match(self.name):
            _bad("name", self.name, "must be 1-128 characters of A-Z a-z 0-9 . _ -")

    @property
    def public_key_bytes(self) -> bytes:
        """The 32 raw Ed25519 public-key bytes."""
        return bytes.fromhex(self.public_key)

    @property
    def fingerprint(self) -> str:
        return signing.fingerprint(self.public_key_bytes)

    @property
    def created_iso(self) -> str:
        return self.created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, exactly the fields of manifest.json."""
        return {
            "format_version": self.format_version,
            "files": dict(self.files),
            "base_model_sha256": self.base_model_sha256,
            "a_seed": self.a_seed,
            "a_sha256": self.a_sha256,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "public_key": self.public_key,
            "created": self.created_iso,
            "name": self.name,
            "example_count": self.example_count,
        }

    def to_bytes(self) -> bytes:
        """Deterministic JSON: sorted keys, no whitespace, ASCII only."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")


def parse_manifest(data: bytes) -> Manifest:
    """Strictly parse manifest.json bytes (FormatError on size, syntax, keys, types, values)."""
    obj = loads_strict(data, what=MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    if not isinstance(obj, dict):
        raise FormatError(f"{MANIFEST_NAME} must be a JSON object, got {type(obj).__name__}")
    missing, unknown = set(_FIELDS) - set(obj), set(obj) - set(_FIELDS)
    if missing or unknown:
        raise FormatError(
            f"{MANIFEST_NAME} keys are wrong: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    if obj["format_version"] != MANIFEST_FORMAT_VERSION:
        raise FormatError(
            f"{MANIFEST_NAME} format_version {obj['format_version']!r} is not "
            f"{MANIFEST_FORMAT_VERSION}; upgrade seqr or re-export with this version"
        )
    for key, kind in _FIELDS.items():
        value = obj[key]
        ok = (
            isinstance(value, int | float) if kind is float else isinstance(value, kind)
        ) and not isinstance(value, bool)
        if not ok:
            raise FormatError(
                f"{MANIFEST_NAME} field {key} must be {kind.__name__}, "
                f"got {type(value).__name__} {value!r:.60}"
            )
    created = obj["created"]
    if not _CREATED.match(created):
        raise FormatError(
            f"{MANIFEST_NAME} field created {created!r:.60} is not ISO-8601 UTC "
            "like 2025-01-02T03:04:05.000006Z"
        )
    try:
        created_at = datetime.fromisoformat(created)
    except ValueError as exc:
        raise FormatError(f"{MANIFEST_NAME} field created {created!r}: {exc}") from None
    return Manifest(
        files=obj["files"],
        base_model_sha256=obj["base_model_sha256"],
        a_seed=obj["a_seed"],
        a_sha256=obj["a_sha256"],
        rank=obj["rank"],
        alpha=obj["alpha"],
        target_modules=tuple(obj["target_modules"]),
        public_key=obj["public_key"],
        created=created_at,
        name=obj["name"],
        example_count=obj["example_count"],
        format_version=obj["format_version"],
    )


def manifest_sha256(manifest_bytes: bytes) -> str:
    """The hash that names a submission: sha256 of the exact manifest.json bytes."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def verify_manifest_signature(manifest_bytes: bytes, signature: bytes) -> Manifest:
    """Parse the manifest and check its signature by the key it names.

    FormatError for a malformed manifest; SignatureError when the signature does not verify
    over these exact bytes. Whether that key is trusted is the caller's decision.
    """
    manifest = parse_manifest(manifest_bytes)
    signing.verify(manifest.public_key_bytes, manifest_bytes, signature)
    return manifest


def check_export_files(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    """Every listed file is present with its signed sha256, and nothing else is there.

    SignatureError on any difference: the bytes are not the ones the signature covers.
    """
    payload = {n for n in files if n not in (MANIFEST_NAME, SIGNATURE_NAME)}
    missing, extra = set(manifest.files) - payload, payload - set(manifest.files)
    if missing or extra:
        raise SignatureError(
            f"export files differ from the signed manifest: missing {sorted(missing)}, "
            f"not signed {sorted(extra)}"
        )
    for name, expected in manifest.files.items():
        actual = hashlib.sha256(files[name]).hexdigest()
        if actual != expected:
            raise SignatureError(
                f"{name} has sha256 {actual[:16]}... but the manifest signed {expected[:16]}...; "
                "the file was changed after signing"
            )


def verify_export_files(
    files: Mapping[str, bytes], *, max_total_bytes: int = DEFAULT_MAX_EXPORT_BYTES
) -> Manifest:
    """Verify an export given as bytes (no I/O): sizes, signature, then every file's hash.

    Returns the manifest; raises FormatError (too big, malformed, missing manifest or
    signature) or SignatureError (bad signature, changed/missing/unsigned file).
    """
    _check_sizes(files, max_total_bytes)
    for required in (MANIFEST_NAME, SIGNATURE_NAME):
        if required not in files:
            raise FormatError(f"export has no {required}; sign it with sign_export first")
    manifest = verify_manifest_signature(files[MANIFEST_NAME], files[SIGNATURE_NAME])
    check_export_files(manifest, files)
    return manifest


def sign_export(
    folder: Path,
    private_key: Ed25519PrivateKey,
    *,
    name: str,
    base_model_sha256: str,
    a_seed: int,
    a_sha256: str,
    rank: int,
    alpha: float,
    target_modules: list[str] | tuple[str, ...],
    example_count: int,
    created: datetime | None = None,
) -> Manifest:
    """Hash every file in ``folder``, write manifest.json and manifest.sig (each atomically).

    An existing manifest and signature are replaced. A crash between the two writes leaves
    a folder that fails verification (fails closed), never one that verifies wrongly.
    ``created`` defaults to now (UTC); it must increase between submissions by one key.
    """
    folder = Path(folder)
    files = read_export(folder)
    payload = {n: b for n, b in files.items() if n not in (MANIFEST_NAME, SIGNATURE_NAME)}
    manifest = Manifest(
        files={n: hashlib.sha256(b).hexdigest() for n, b in payload.items()},
        base_model_sha256=base_model_sha256,
        a_seed=a_seed,
        a_sha256=a_sha256,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(sorted(set(target_modules))),
        public_key=signing.public_key_bytes(private_key).hex(),
        created=datetime.now(UTC) if created is None else created,
        name=name,
        example_count=example_count,
    )
    data = manifest.to_bytes()
    signature = signing.sign(private_key, data)
    signing.verify(manifest.public_key_bytes, data, signature)  # verify before use
    write_atomic(folder / MANIFEST_NAME, data)
    write_atomic(folder / SIGNATURE_NAME, signature)
    return manifest


def _check_sizes(files: Mapping[str, bytes], max_total_bytes: int) -> None:
    if len(files) > MAX_EXPORT_FILES:
        raise FormatError(f"export has {len(files)} files, over the limit of {MAX_EXPORT_FILES}")
    total = sum(len(b) for b in files.values())
    if total > max_total_bytes:
        raise FormatError(f"export is {total} bytes, over the limit of {max_total_bytes} bytes")
    for name in files:
        check_file_name(name)
    if MANIFEST_NAME in files and len(files[MANIFEST_NAME]) > MAX_MANIFEST_BYTES:
        raise FormatError(
            f"{MANIFEST_NAME} is {len(files[MANIFEST_NAME])} bytes, over {MAX_MANIFEST_BYTES}"
        )


def _check_int(key: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(key, value, "must be an integer")
    if not low <= value <= high:
        _bad(key, value, f"must be in [{low}, {high}]")


def _bad(key: str, value: object, why: str) -> NoReturn:
    raise FormatError(f"manifest field {key} = {value!r:.80} {why}")
