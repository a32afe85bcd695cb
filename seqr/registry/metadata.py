"""Typed registry metadata and its exact JSON payloads: root, registry version, tree head.

Three signed payload types (each inside a DSSE envelope, see envelope.py):

- Root (TUF "root" role): the server keys (keyid -> ECDSA P-256 public key) and the k-of-n
  threshold for everything else. Root N+1 must be signed by a threshold of root N's keys
  AND of its own (TUF spec 1.0.x, client workflow step 5.3.4).
- RegistryMetadata: one version of the adapter registry: strictly increasing ``version``,
  ``expires`` (freeze), ``previous`` (version and SHA-256 of the previous metadata file),
  the client allow-list and revocations, and one Entry per adapter.
- TreeHead (tree_head.py): RFC 9162 signed tree head over all registry versions.

Parsing here is structural (types, formats, exact key sets); the semantic checks (versions,
thresholds, allow-list, files) live in verify.py so each attack has one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from seqr.core import signing
from seqr.core.errors import FormatError, KeyFileError
from seqr.registry.codec import Fields, check_hex, dumps, format_time, loads

__all__ = [
    "SPEC_VERSION",
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "STATS_FILE",
    "MANIFEST_FILE",
    "MANIFEST_SIG_FILE",
    "EXPORT_FILES",
    "CONTRIBUTIONS_FILE",
    "GROUP_FILES",
    "FileInfo",
    "TensorSpec",
    "FederationPin",
    "Root",
    "ClientKey",
    "Revocation",
    "Entry",
    "RegistryMetadata",
    "parse_pointer",
    "pointer_bytes",
]

SPEC_VERSION = "1"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
STATS_FILE = "norm_stats.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_SIG_FILE = "model.sig"  # the client's OpenSSF model-signing bundle
# Every file of a client's signed export, stored under adapters/<sha256 of ADAPTER_FILE>/.
EXPORT_FILES = (CONFIG_FILE, ADAPTER_FILE, STATS_FILE, MANIFEST_FILE, MANIFEST_SIG_FILE)
# A group adapter (clients of one task federated it, contributions.py) adds the list of the
# clients' signed contributions; its manifest is signed by a server key.
CONTRIBUTIONS_FILE = "contributions.json"
GROUP_FILES = (*EXPORT_FILES, CONTRIBUTIONS_FILE)
MAX_CONTRIBUTORS = 10_000
MAX_ENTRIES = 1_000_000
MAX_KEYS = 64
_SHA = 32  # bytes of a SHA-256 digest


@dataclass(frozen=True)
class FileInfo:
    """Hash and length of one stored file (TUF "targets" style; length bounds endless data)."""

    sha256: str
    length: int

    def to_json(self) -> dict[str, Any]:
        return {"length": self.length, "sha256": self.sha256}

    @classmethod
    def from_json(cls, value: object, what: str) -> FileInfo:
        f = Fields(value, what, ("length", "sha256"))
        return cls(sha256=f.hex("sha256", _SHA), length=f.integer("length"))


@dataclass(frozen=True)
class TensorSpec:
    """Expected dtype and shape of one tensor in every adapter of this registry."""

    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, value: object, what: str) -> TensorSpec:
        f = Fields(value, what, ("dtype", "shape"))
        shape = f.array("shape", max_len=8)
        for i, dim in enumerate(shape):
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise FormatError(f"{what}.shape[{i}] must be a non-negative integer, got {dim!r}")
        return cls(dtype=f.text("dtype", max_len=16), shape=tuple(shape))


@dataclass(frozen=True)
class FederationPin:
    """What every adapter's signed manifest must agree on (one base model, one shared A)."""

    base_model_sha256: str
    a_sha256: str
    a_seed: int
    rank: int
    target_modules: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "base_model_sha256": self.base_model_sha256,
            "a_sha256": self.a_sha256,
            "a_seed": self.a_seed,
            "rank": self.rank,
            "target_modules": list(self.target_modules),
        }

    @classmethod
    def from_json(cls, value: object, what: str) -> FederationPin:
        f = Fields(
            value, what, ("base_model_sha256", "a_sha256", "a_seed", "rank", "target_modules")
        )
        modules = f.array("target_modules", max_len=256)
        if not all(isinstance(m, str) and 0 < len(m) <= 256 for m in modules):
            raise FormatError(f"{what}.target_modules must be a list of module names")
        return cls(
            base_model_sha256=f.hex("base_model_sha256", _SHA),
            a_sha256=f.hex("a_sha256", _SHA),
            a_seed=f.integer("a_seed"),
            rank=f.integer("rank", low=1),
            target_modules=tuple(modules),
        )


def _public_key(hex_text: object, what: str) -> bytes:
    try:
        return signing.parse_public_key(check_hex(hex_text, signing.PUBLIC_KEY_BYTES, what))
    except KeyFileError as exc:
        raise FormatError(f"{what}: {exc}") from None


def _keyid(keyid: str, public: bytes, what: str) -> None:
    if signing.fingerprint(public) != keyid:
        raise FormatError(
            f"{what}: key id {keyid!r} is not the fingerprint of its key "
            f"({signing.fingerprint(public)!r})"
        )


@dataclass(frozen=True)
class Root:
    """Server keys and threshold (TUF root role); versions start at 1."""

    version: int
    issued: datetime
    expires: datetime
    keys: Mapping[str, bytes]  # keyid (signing.fingerprint) -> DER public key (seqr.core.signing)
    threshold: int

    def to_payload(self) -> bytes:
        return dumps(
            {
                "_type": "root",
                "spec_version": SPEC_VERSION,
                "version": self.version,
                "issued": format_time(self.issued),
                "expires": format_time(self.expires),
                "keys": {k: v.hex() for k, v in self.keys.items()},
                "threshold": self.threshold,
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes, what: str = "root") -> Root:
        f = Fields(
            loads(payload, what),
            what,
            ("_type", "spec_version", "version", "issued", "expires", "keys", "threshold"),
        )
        f.const("_type", "root")
        f.const("spec_version", SPEC_VERSION)
        raw_keys = f.mapping("keys")
        if not 1 <= len(raw_keys) <= MAX_KEYS:
            raise FormatError(f"{what}.keys must list 1 to {MAX_KEYS} keys, got {len(raw_keys)}")
        keys = {}
        for keyid, hex_key in raw_keys.items():
            public = _public_key(hex_key, f"{what}.keys[{keyid}]")
            _keyid(keyid, public, f"{what}.keys")
            keys[keyid] = public
        # TUF: 1 <= threshold <= number of keys, or the root can never be satisfied.
        threshold = f.integer("threshold", low=1, high=len(keys))
        return cls(
            f.integer("version", low=1), f.time("issued"), f.time("expires"), keys, threshold
        )


@dataclass(frozen=True)
class ClientKey:
    """An allow-listed client key (the registry's admission list)."""

    keyid: str
    public_key: bytes
    enrolled: datetime


@dataclass(frozen=True)
class Revocation:
    """A client key the server revoked: its adapters leave the registry for good."""

    keyid: str
    public_key: bytes
    revoked: datetime
    reason: str


@dataclass(frozen=True)
class Entry:
    """One published adapter: its files, its client and the client's signature.

    A group adapter (``contributors`` set) is signed by a server key instead of a client's,
    and lists the key ids of the clients whose signed contributions produced it.
    """

    adapter_sha256: str  # SHA-256 of adapter_model.safetensors: the content address
    client: str  # keyid of the key that signed the manifest (a server key for a group)
    client_key: bytes  # DER public key (seqr.core.signing)
    admitted: datetime
    files: Mapping[str, FileInfo]  # every name in EXPORT_FILES (GROUP_FILES for a group)
    contributors: tuple[str, ...] | None = None  # sorted client key ids; None: not a group

    @property
    def directory(self) -> str:
        return f"adapters/{self.adapter_sha256}"

    @property
    def statistics(self) -> FileInfo:
        return self.files[STATS_FILE]

    @property
    def is_group(self) -> bool:
        return self.contributors is not None

    def depends_on(self, keyid: str) -> bool:
        """Whether revoking ``keyid`` must remove this adapter (its signer or a contributor)."""
        return self.client == keyid or keyid in (self.contributors or ())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "adapter_sha256": self.adapter_sha256,
            "client": self.client,
            "client_key": self.client_key.hex(),
            "admitted": format_time(self.admitted),
            "files": {name: info.to_json() for name, info in self.files.items()},
        }
        if self.contributors is not None:
            out["contributors"] = list(self.contributors)
        return out

    @classmethod
    def from_json(cls, value: object, what: str) -> Entry:
        f = Fields(
            value,
            what,
            ("adapter_sha256", "client", "client_key", "admitted", "files"),
            optional=("contributors",),
        )
        contributors = None
        if f.has("contributors"):
            raw = f.array("contributors", max_len=MAX_CONTRIBUTORS)
            if not raw or not all(isinstance(c, str) and 0 < len(c) <= 128 for c in raw):
                raise FormatError(f"{what}.contributors must be a non-empty list of key ids")
            if raw != sorted(set(raw)):
                raise FormatError(f"{what}.contributors must be sorted and without duplicates")
            contributors = tuple(raw)
        names = GROUP_FILES if contributors is not None else EXPORT_FILES
        files_obj = f.mapping("files")
        if set(files_obj) != set(names):
            raise FormatError(
                f"{what}.files must list exactly {', '.join(names)}; "
                f"got {', '.join(sorted(files_obj))}"
            )
        files = {n: FileInfo.from_json(files_obj[n], f"{what}.files.{n}") for n in names}
        client_key = _public_key(f.raw("client_key"), f.path("client_key"))
        client = f.text("client", max_len=128)
        _keyid(client, client_key, what)
        return cls(
            adapter_sha256=f.hex("adapter_sha256", _SHA),
            client=client,
            client_key=client_key,
            admitted=f.time("admitted"),
            files=files,
            contributors=contributors,
        )


@dataclass(frozen=True)
class RegistryMetadata:
    """One version of the registry (what the server signs and the log records)."""

    version: int
    root_version: int
    issued: datetime
    expires: datetime
    previous: tuple[int, str] | None  # (version, SHA-256 of that metadata file), None for 1
    clients: Mapping[str, ClientKey]
    revoked: Mapping[str, Revocation]
    tensor_spec: Mapping[str, TensorSpec] | None
    federation: FederationPin | None
    entries: tuple[Entry, ...]

    def to_payload(self) -> bytes:
        return dumps(
            {
                "_type": "registry",
                "spec_version": SPEC_VERSION,
                "version": self.version,
                "root_version": self.root_version,
                "issued": format_time(self.issued),
                "expires": format_time(self.expires),
                "previous": None
                if self.previous is None
                else {"version": self.previous[0], "sha256": self.previous[1]},
                "clients": {
                    c.keyid: {"public_key": c.public_key.hex(), "enrolled": format_time(c.enrolled)}
                    for c in self.clients.values()
                },
                "revoked": {
                    r.keyid: {
                        "public_key": r.public_key.hex(),
                        "revoked": format_time(r.revoked),
                        "reason": r.reason,
                    }
                    for r in self.revoked.values()
                },
                "tensor_spec": None
                if self.tensor_spec is None
                else {name: spec.to_json() for name, spec in self.tensor_spec.items()},
                "federation": None if self.federation is None else self.federation.to_json(),
                "entries": [e.to_json() for e in self.entries],
            }
        )

    @classmethod
    def from_payload(
        cls,
        payload: bytes,
        what: str = "registry",
        entry_cache: dict[str, Entry] | None = None,
    ) -> RegistryMetadata:
        """Parse strictly. ``entry_cache`` (exact entry JSON -> Entry) lets an audit that
        parses every version validate each of the entries that repeat across versions once.
        The key is repr() of the parsed JSON value: injective for JSON types (str, int, list,
        dict, None, bool), so equal keys mean equal entries."""
        f = Fields(
            loads(payload, what),
            what,
            (
                "_type",
                "spec_version",
                "version",
                "root_version",
                "issued",
                "expires",
                "previous",
                "clients",
                "revoked",
                "tensor_spec",
                "federation",
                "entries",
            ),
        )
        f.const("_type", "registry")
        f.const("spec_version", SPEC_VERSION)
        previous = None
        if f.raw("previous") is not None:
            p = Fields(f.raw("previous"), f.path("previous"), ("version", "sha256"))
            previous = (p.integer("version", low=1), p.hex("sha256", _SHA))
        clients = {}
        for keyid, item in f.mapping("clients").items():
            c = Fields(item, f"{what}.clients[{keyid}]", ("public_key", "enrolled"))
            public = _public_key(c.raw("public_key"), c.path("public_key"))
            _keyid(keyid, public, c.what)
            clients[keyid] = ClientKey(keyid, public, c.time("enrolled"))
        revoked = {}
        for keyid, item in f.mapping("revoked").items():
            r = Fields(item, f"{what}.revoked[{keyid}]", ("public_key", "revoked", "reason"))
            public = _public_key(r.raw("public_key"), r.path("public_key"))
            _keyid(keyid, public, r.what)
            revoked[keyid] = Revocation(keyid, public, r.time("revoked"), r.text("reason"))
        spec = None
        if f.raw("tensor_spec") is not None:
            spec = {
                name: TensorSpec.from_json(v, f"{what}.tensor_spec[{name}]")
                for name, v in f.mapping("tensor_spec").items()
            }
        federation = None
        if f.raw("federation") is not None:
            federation = FederationPin.from_json(f.raw("federation"), f.path("federation"))
        entries = []
        for i, item in enumerate(f.array("entries", max_len=MAX_ENTRIES)):
            key = repr(item) if entry_cache is not None else ""
            entry = entry_cache.get(key) if entry_cache is not None else None
            if entry is None:
                entry = Entry.from_json(item, f"{what}.entries[{i}]")
                if entry_cache is not None:
                    entry_cache[key] = entry
            entries.append(entry)
        return cls(
            version=f.integer("version", low=1),
            root_version=f.integer("root_version", low=1),
            issued=f.time("issued"),
            expires=f.time("expires"),
            previous=previous,
            clients=clients,
            revoked=revoked,
            tensor_spec=spec,
            federation=federation,
            entries=tuple(entries),
        )


def pointer_bytes(version: int) -> bytes:
    """``latest.json``: which complete version to read. Unsigned: only a hint, since the
    metadata it names is signed, versioned and checked against the trusted state."""
    return dumps({"version": version}) + b"\n"


def parse_pointer(data: bytes) -> int:
    f = Fields(loads(data, "latest.json"), "latest.json", ("version",))
    return f.integer("version", low=1)
