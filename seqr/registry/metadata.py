"""What seqr signs inside the TUF repository, beside TUF's own fields (pure; no I/O).

- ``RegistryDocument`` is the target file ``seqr/registry.json``: the federation pin (base
  model, shared A, LoRA shape), the tensor layout every adapter must have, the client
  allow-list and the revocations. Its hash and length are in the signed targets metadata, so
  it is as trusted as the targets role (TUF spec 1.0 section 4.5).
- ``AdapterRecord`` rides in the ``custom`` field of an adapter's weights target: its name,
  the full fingerprint of the key that signed its export, when it was admitted, the SHA-256 of
  its manifest and statistics, the files that make up the export and, for a group adapter,
  its contributors. Custom fields are signed with the targets metadata; they carry strings and
  integers only (OLPC canonical JSON, which TUF signs, has no floats).

Parsing is structural and strict (codec.Fields: exact key sets, typed values); the checks that
need several pieces at once (key allowed? files match?) live in entries.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from seqr.core import signing
from seqr.core.errors import FormatError, KeyFileError
from seqr.registry.codec import Fields, check_hex, dumps, format_time, loads

__all__ = [
    "CONTRIBUTIONS_FILE",
    "TensorSpec",
    "FederationPin",
    "ClientKey",
    "Revocation",
    "RegistryDocument",
    "AdapterRecord",
]

# A group adapter (clients of one task federated it, contributions.py) adds the list of the
# clients' signed contributions to the export files; its export is signed by a server key.
CONTRIBUTIONS_FILE = "contributions.json"
DOCUMENT_FORMAT = 1
MAX_CLIENTS = 1_000_000
MAX_CONTRIBUTORS = 10_000
MAX_FILES = 16
_SHA = 32
_MAX_PUBLIC_KEY_BYTES = 1024


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


def parse_public_key_hex(value: object, what: str) -> bytes:
    """Public key bytes from their hex form, validated as a key seqr can verify with."""
    if not isinstance(value, str) or not 2 <= len(value) <= 2 * _MAX_PUBLIC_KEY_BYTES:
        raise FormatError(f"{what} must be a hex public key, got {value!r:.40}")
    check_hex(value, len(value) // 2, what)
    public = bytes.fromhex(value)
    try:
        signing.fingerprint(public)
    except KeyFileError as exc:
        raise FormatError(f"{what}: {exc}") from None
    return public


def _checked_fingerprint(keyid: str, public: bytes, what: str) -> str:
    # Compare full fingerprints, never short ids: a colliding short id is not the same key.
    if keyid != signing.fingerprint(public):
        raise FormatError(
            f"{what}: key id {keyid!r} is not the fingerprint of its key "
            f"({signing.fingerprint(public)!r})"
        )
    return keyid


@dataclass(frozen=True)
class ClientKey:
    """An allow-listed client key (the registry's admission list)."""

    keyid: str  # signing.fingerprint(public_key): the FULL SHA-256 fingerprint
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
class RegistryDocument:
    """``seqr/registry.json``: federation pin, tensor layout, allow-list and revocations."""

    federation: FederationPin | None = None
    tensor_spec: Mapping[str, TensorSpec] | None = None
    clients: Mapping[str, ClientKey] = field(default_factory=dict)
    revoked: Mapping[str, Revocation] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return dumps(
            {
                "format": DOCUMENT_FORMAT,
                "federation": None if self.federation is None else self.federation.to_json(),
                "tensor_spec": None
                if self.tensor_spec is None
                else {name: spec.to_json() for name, spec in self.tensor_spec.items()},
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
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "seqr/registry.json") -> RegistryDocument:
        f = Fields(
            loads(data, what), what, ("format", "federation", "tensor_spec", "clients", "revoked")
        )
        f.integer("format", low=DOCUMENT_FORMAT, high=DOCUMENT_FORMAT)
        federation = None
        if f.raw("federation") is not None:
            federation = FederationPin.from_json(f.raw("federation"), f.path("federation"))
        spec = None
        if f.raw("tensor_spec") is not None:
            spec = {
                name: TensorSpec.from_json(v, f"{what}.tensor_spec[{name}]")
                for name, v in f.mapping("tensor_spec").items()
            }
        clients, revoked = f.mapping("clients"), f.mapping("revoked")
        if len(clients) + len(revoked) > MAX_CLIENTS:
            raise FormatError(f"{what} lists more than {MAX_CLIENTS} client keys")
        allowed = {}
        for keyid, item in clients.items():
            c = Fields(item, f"{what}.clients[{keyid}]", ("public_key", "enrolled"))
            public = parse_public_key_hex(c.raw("public_key"), c.path("public_key"))
            allowed[keyid] = ClientKey(
                _checked_fingerprint(keyid, public, c.what), public, c.time("enrolled")
            )
        gone = {}
        for keyid, item in revoked.items():
            r = Fields(item, f"{what}.revoked[{keyid}]", ("public_key", "revoked", "reason"))
            public = parse_public_key_hex(r.raw("public_key"), r.path("public_key"))
            gone[keyid] = Revocation(
                _checked_fingerprint(keyid, public, r.what),
                public,
                r.time("revoked"),
                r.text("reason", max_len=1000),
            )
        both = allowed.keys() & gone.keys()
        if both:
            raise FormatError(f"{what}: key(s) {sorted(both)[:3]} are both allowed and revoked")
        return cls(federation, spec, allowed, gone)


@dataclass(frozen=True)
class AdapterRecord:
    """seqr's signed fields of one adapter (the ``custom`` object of its weights target)."""

    adapter_id: str  # SHA-256 of adapter_model.safetensors (its content address)
    name: str  # the manifest's adapter/domain label
    client: str  # full fingerprint of the key that signed the export (a server key: group)
    admitted: datetime
    manifest_sha256: str  # the exact manifest.json bytes the client signed
    stats_sha256: str  # the exact norm_stats.json bytes routers z-score with
    files: tuple[str, ...]  # every file of the export, sorted
    contributors: tuple[str, ...] | None = None  # group adapters: sorted client fingerprints

    @property
    def is_group(self) -> bool:
        return self.contributors is not None

    def depends_on(self, keyid: str) -> bool:
        """Whether revoking ``keyid`` must remove this adapter (its signer or a contributor)."""
        return self.client == keyid or keyid in (self.contributors or ())

    def to_custom(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "adapter": self.adapter_id,
            "name": self.name,
            "client": self.client,
            "admitted": format_time(self.admitted),
            "manifest_sha256": self.manifest_sha256,
            "stats_sha256": self.stats_sha256,
            "files": list(self.files),
        }
        if self.contributors is not None:
            out["contributors"] = list(self.contributors)
        return out

    @classmethod
    def from_custom(cls, value: object, what: str) -> AdapterRecord:
        f = Fields(
            value,
            what,
            ("adapter", "name", "client", "admitted", "manifest_sha256", "stats_sha256", "files"),
            optional=("contributors",),
        )
        files = f.array("files", max_len=MAX_FILES)
        if not all(isinstance(n, str) for n in files) or files != sorted(set(files)):
            raise FormatError(f"{what}.files must be a sorted list of distinct file names")
        contributors = None
        if f.has("contributors"):
            raw = f.array("contributors", max_len=MAX_CONTRIBUTORS)
            if not raw or not all(isinstance(c, str) and 0 < len(c) <= 128 for c in raw):
                raise FormatError(f"{what}.contributors must be a non-empty list of key ids")
            if raw != sorted(set(raw)):
                raise FormatError(f"{what}.contributors must be sorted and without duplicates")
            contributors = tuple(raw)
        return cls(
            adapter_id=f.hex("adapter", _SHA),
            name=f.text("name", max_len=128),
            client=f.text("client", max_len=128),
            admitted=f.time("admitted"),
            manifest_sha256=f.hex("manifest_sha256", _SHA),
            stats_sha256=f.hex("stats_sha256", _SHA),
            files=tuple(files),
            contributors=contributors,
        )
