"""The seqr manifest of an adapter export, one of the files its model-signing bundle signs.

An export folder holds the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``),
its calibration statistics (``norm_stats.json``), ``manifest.json`` (what seqr needs to know
about the adapter: base model, shared A, LoRA shape, the signer's public key, creation time,
name, example count) and ``model.sig``: an OpenSSF model-signing bundle over ALL the other files
(seqr.core.model_signature), made with the key manifest.json names. So

    model_signing verify key EXPORT --signature EXPORT/model.sig --public_key signing_key.pub

checks a whole export with the standard tool, and ``verify_export_files`` checks the same bytes
in memory. Verification never re-serialises anything: the bundle's signature covers the SHA-256
of each file's exact bytes.

manifest.json is written with sorted keys and no whitespace. ``alpha`` is its only float: a
JSON number (written with Python's shortest round-trip repr, e.g. ``16.0``); because signatures
cover exact bytes, no canonical float form is needed (DSSE's approach, docs/THREATS.md).
``created`` is ISO-8601 UTC with a ``Z`` suffix, e.g. ``2025-01-02T03:04:05.000006Z``.
``public_key`` is the hex of the signer's DER public key (seqr.core.signing).
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
from typing import Any, NoReturn

from seqr.core import key_files, signing
from seqr.core.atomic_write import write_atomic
from seqr.core.errors import FormatError, KeyFileError
from seqr.core.export_folder import (
    DEFAULT_MAX_EXPORT_BYTES,
    MAX_EXPORT_FILES,
    check_file_name,
    read_export,
)
from seqr.core.model_signature import (
    BUNDLE_NAME,
    MAX_BUNDLE_BYTES,
    check_signed_digests,
    check_signed_names,
    sign_folder,
    verify_bundle,
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
    "EXPORT_FILE_NAMES",
    "Manifest",
    "parse_manifest",
    "manifest_sha256",
    "sign_export",
    "verify_export_files",
    "read_export",
]

# 2: the files are signed by a model-signing bundle (model.sig), not listed in the manifest.
MANIFEST_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = BUNDLE_NAME
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
NORM_STATS_NAME = "norm_stats.json"
# The files a complete adapter export holds besides the manifest and its signature.
EXPORT_PAYLOAD_NAMES = frozenset({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, NORM_STATS_NAME})
# Every file of a client's export: the payload, the manifest and the bundle that signs them all.
EXPORT_FILE_NAMES = EXPORT_PAYLOAD_NAMES | {MANIFEST_NAME, SIGNATURE_NAME}

MAX_MANIFEST_BYTES = 64 * 1024  # bytes; a manifest is ~1 KB
MAX_NAME_CHARS = 128
MAX_RANK = 4096
MAX_INT64 = 2**63 - 1

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,255}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
_KEY_HEX_CHARS = 2 * signing.PUBLIC_KEY_BYTES
_CREATED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
_FIELDS = {
    "format_version": int,
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
    """What a client states about one adapter export; validates every field on construction."""

    base_model_sha256: str
    a_seed: int  # public seed of the shared frozen A
    a_sha256: str  # hash of the shared A matrices
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # sorted, unique
    public_key: str  # hex of the DER public key (ECDSA P-256) whose bundle signs the export
    created: datetime  # timezone-aware, UTC
    name: str  # adapter / domain label
    example_count: int  # training examples the adapter saw
    format_version: int = field(default=MANIFEST_FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.format_version != MANIFEST_FORMAT_VERSION:
            _bad("format_version", self.format_version, f"must be {MANIFEST_FORMAT_VERSION}")
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
        key = self.public_key
        if not isinstance(key, str) or not _HEX.match(key) or len(key) > 4 * _KEY_HEX_CHARS:
            _bad("public_key", "...", f"must be {_KEY_HEX_CHARS} lowercase hex digits (DER key)")
        try:
            signing.check_public_key(bytes.fromhex(key), what="manifest field public_key")
        except KeyFileError as exc:
            raise FormatError(str(exc)) from None
        if not isinstance(self.created, datetime) or self.created.utcoffset() is None:
            _bad("created", self.created, "must be a timezone-aware datetime (e.g. tz=UTC)")
        object.__setattr__(self, "created", self.created.astimezone(UTC))
        if not isinstance(self.name, str) or not _LABEL.match(self.name):
            _bad("name", self.name, "must be 1-128 characters of A-Z a-z 0-9 . _ -")

    @property
    def public_key_bytes(self) -> bytes:
        """The signer's public key: DER SubjectPublicKeyInfo bytes (seqr.core.signing)."""
        return bytes.fromhex(self.public_key)

    @property
    def fingerprint(self) -> str:
        """The signer's full key fingerprint, ``sha256:`` + 64 hex."""
        return signing.fingerprint(self.public_key_bytes)

    @property
    def created_iso(self) -> str:
        return self.created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, exactly the fields of manifest.json."""
        return {
            "format_version": self.format_version,
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
    version = obj.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise FormatError(
            f"{MANIFEST_NAME} format_version {version!r:.20} is not {MANIFEST_FORMAT_VERSION}"
            + (" (format 1 was signed by manifest.sig; re-export)" if version == 1 else "")
            + "; export again with this version of seqr"
        )
    missing, unknown = set(_FIELDS) - set(obj), set(obj) - set(_FIELDS)
    if missing or unknown:
        raise FormatError(
            f"{MANIFEST_NAME} keys are wrong: missing {sorted(missing)}, "
            f"unknown {sorted(k[:40] for k in unknown)[:5]}"
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


def verify_export_files(
    files: Mapping[str, bytes], *, max_total_bytes: int = DEFAULT_MAX_EXPORT_BYTES
) -> Manifest:
    """Verify an export given as bytes (no I/O); return its manifest.

    Sizes first, then manifest.json (strict parser) for the signer's key, then model.sig with
    that key, then that the bundle signs exactly the other files, each with its SHA-256.
    FormatError: too big, malformed manifest or bundle, a file missing; SignatureError: the
    signature does not verify with the manifest's key, or a file was changed, added or removed.
    """
    _check_sizes(files, max_total_bytes)
    for required in (MANIFEST_NAME, SIGNATURE_NAME):
        if required not in files:
            raise FormatError(f"export has no {required}; export it with `seqr client train`")
    manifest = parse_manifest(files[MANIFEST_NAME])
    signed = verify_bundle(files[SIGNATURE_NAME], manifest.public_key_bytes)
    check_signed_names(signed, files)
    check_signed_digests(signed, files)
    return manifest


def sign_export(
    folder: Path,
    key: key_files.SigningKeyFile,
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
    """Write manifest.json into ``folder``, then sign every file into model.sig (model-signing).

    An existing manifest and bundle are replaced. A crash between the two writes leaves a
    folder that fails verification (fails closed), never one that verifies wrongly.
    ``created`` defaults to now (UTC); it must increase between submissions by one key.
    """
    folder = Path(folder)
    read_export(folder)  # refuse symlinks, subfolders, odd names before anything is written
    manifest = Manifest(
        base_model_sha256=base_model_sha256,
        a_seed=a_seed,
        a_sha256=a_sha256,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(sorted(set(target_modules))),
        public_key=key.public.hex(),
        created=datetime.now(UTC) if created is None else created,
        name=name,
        example_count=example_count,
    )
    write_atomic(folder / MANIFEST_NAME, manifest.to_bytes())
    sign_folder(folder, key)  # verifies the bundle it wrote against the folder and the key
    return manifest


def _check_sizes(files: Mapping[str, bytes], max_total_bytes: int) -> None:
    if len(files) > MAX_EXPORT_FILES:
        raise FormatError(f"export has {len(files)} files, over the limit of {MAX_EXPORT_FILES}")
    total = sum(len(b) for b in files.values())
    if total > max_total_bytes:
        raise FormatError(f"export is {total} bytes, over the limit of {max_total_bytes} bytes")
    for name in files:
        check_file_name(name)
    for name, cap in ((MANIFEST_NAME, MAX_MANIFEST_BYTES), (SIGNATURE_NAME, MAX_BUNDLE_BYTES)):
        if name in files and len(files[name]) > cap:
            raise FormatError(f"{name} is {len(files[name])} bytes, over {cap}")


def _check_int(key: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(key, value, "must be an integer")
    if not low <= value <= high:
        _bad(key, value, f"must be in [{low}, {high}]")


def _bad(key: str, value: object, why: str) -> NoReturn:
    raise FormatError(f"manifest field {key} = {value!r:.80} {why}")
