"""The publisher: stages admitted adapters durably and publishes signed registry versions.

Crash safety (a real ``kill -9`` test exercises it): every file is written atomically
(store.py), in an order where latest.json is the commit point:

    stage:   adapters/<sha>/<files>  ->  staging/<seq>.json          (durable queue)
    publish: metadata/<v+1>  ->  log/<v+1>  ->  latest.json  ->  drop consumed staging records

A crash before latest.json leaves version v complete; a restarted Publisher rolls forward a
fully written metadata/<v+1> (it is signed and immutable, so it is completed rather than
re-signed: two different signed files for one version would look like a fork) and then
publishes whatever is still staged, so nothing admitted is lost. One publisher at a time:
an flock on staging/.lock (released by the kernel when a process dies, even by SIGKILL).

Every version is verified with the auditor's own checks before it is written (verify
before use), so a publisher bug cannot sign a registry that clients would reject.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core import signing
from seqr.core.errors import (
    AdmissionError,
    ConfigError,
    FormatError,
    KeyFileError,
    RegistryError,
)
from seqr.core.manifest import verify_export_files
from seqr.registry import merkle, store
from seqr.registry.adapter_check import check_adapter_weights
from seqr.registry.codec import format_time
from seqr.registry.config import PublisherConfig
from seqr.registry.contributions import ContributionsFile, verify_contribution
from seqr.registry.create import write_new_registry
from seqr.registry.entries import verify_entry
from seqr.registry.envelope import (
    REGISTRY_TYPE,
    parse_envelope,
    sign_envelope,
)
from seqr.registry.metadata import (
    ADAPTER_FILE,
    CONTRIBUTIONS_FILE,
    EXPORT_FILES,
    GROUP_FILES,
    Entry,
    FileInfo,
    RegistryMetadata,
    Root,
    TensorSpec,
    parse_pointer,
    pointer_bytes,
)
from seqr.registry.roots import make_root, sign_root, verify_root_chain, verify_root_update
from seqr.registry.staging import StagingQueue
from seqr.registry.tree_head import sign_tree_head, verify_tree_head
from seqr.registry.verify import verify_version

__all__ = ["Publisher", "PublishedVersion"]

_CAP = 1 << 40  # the publisher reads only files it wrote itself; the auditor has real caps


@dataclass(frozen=True)
class PublishedVersion:
    """What one publish produced (for logs and the ServerApp's reply)."""

    version: int
    root_version: int
    metadata_sha256: str
    tree_size: int
    tree_root: str
    entries: int
    added: tuple[str, ...]  # adapter SHA-256s new in this version
    removed: tuple[str, ...]  # adapter SHA-256s dropped with a revoked client


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


class Publisher:
    """Single writer of one registry folder. Use ``Publisher.create`` for a new registry."""

    def __init__(
        self,
        path: Path,
        signing_keys: Sequence[EllipticCurvePrivateKey],
        config: PublisherConfig | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config or PublisherConfig()
        if not signing_keys:
            raise ConfigError("Publisher needs at least one signing key")
        self._keys = list(signing_keys)
        if not (self.path / store.POINTER).exists():
            raise RegistryError(
                f"{self.path} has no {store.POINTER}: not a registry (create one with "
                "Publisher.create), or its creation crashed before version 1 (delete it)"
            )
        self._lock_fd: int | None = self._lock()
        try:
            self._load()
            self._recover()
            self._check_config()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- life cycle
    @classmethod
    def create(
        cls,
        path: Path,
        signing_keys: Sequence[EllipticCurvePrivateKey],
        *,
        root_keys: Sequence[bytes] | None = None,
        threshold: int = 1,
        config: PublisherConfig | None = None,
        now: datetime | None = None,
    ) -> Publisher:
        """Create a registry: root 1 (``root_keys``, default the signing keys' public keys,
        k-of-n ``threshold``) and an empty, signed version 1 (create.py); then open it."""
        config = config or PublisherConfig()
        write_new_registry(
            Path(path), signing_keys, root_keys=root_keys, threshold=threshold, config=config,
            when=_now(now),
        )  # fmt: skip
        return cls(path, signing_keys, config)

    def close(self) -> None:
        """Release the single-writer lock (the object is unusable afterwards)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def version(self) -> int:
        return self._meta.version

    @property
    def metadata(self) -> RegistryMetadata:
        return self._meta

    @property
    def root(self) -> Root:
        return self._roots[-1]

    # ----------------------------------------------------------------- staging
    def enrol_client(self, public_key: bytes, *, now: datetime | None = None) -> str:
        """Allow-list a client key (takes effect at the next publish); returns its key id."""
        try:
            keyid = signing.fingerprint(signing.parse_public_key(bytes(public_key).hex()))
        except KeyFileError as exc:
            raise AdmissionError("bad_client_key", str(exc)) from None
        clients, revoked, _ = self._queue.apply(self._meta)
        if keyid in revoked:
            raise AdmissionError("revoked_client", f"client key {keyid} was revoked for good")
        if keyid not in clients:
            self._queue.append(
                {
                    "kind": "enrol",
                    "public_key": bytes(public_key).hex(),
                    "time": format_time(_now(now)),
                }
            )
        return keyid

    def revoke_client(self, keyid: str, reason: str, *, now: datetime | None = None) -> None:
        """Revoke a client key for good; its adapters leave the registry at the next publish."""
        clients, revoked, _ = self._queue.apply(self._meta)
        if keyid in revoked:
            return
        if keyid not in clients:
            raise RegistryError(f"client key {keyid} is not enrolled; nothing to revoke")
        if not reason or len(reason) > 1000:
            raise ConfigError("revoke_client needs a reason of 1-1000 characters")
        self._queue.append(
            {"kind": "revoke", "keyid": keyid, "reason": reason, "time": format_time(_now(now))}
        )

    def stage_adapter(self, files: Mapping[str, bytes], *, admitted: datetime | None = None) -> str:
        """Durably queue an admitted adapter (its signed export files) for the next publish.

        Re-verifies the client's signature and every auditor check on the files first.
        Returns the adapter's SHA-256 (its content address). Raises AdmissionError for an
        unknown (when auto_enrol is off), revoked or duplicate adapter.
        """
        group = set(files) == set(GROUP_FILES)
        if set(files) != set(EXPORT_FILES) and not group:
            raise FormatError(
                f"an adapter export must hold exactly {', '.join(EXPORT_FILES)} (a group "
                f"adapter also {CONTRIBUTIONS_FILE}); got {', '.join(sorted(files))}"
            )
        manifest = verify_export_files(files)
        keyid, when = manifest.fingerprint, _now(admitted)
        contributors = self._group_contributors(files, keyid) if group else None
        clients, revoked, entries = self._queue.apply(self._meta)
        # A client's export needs its own key enrolled; a group's, every contributor's.
        keys = contributors if contributors is not None else {keyid: manifest.public_key_bytes}
        for key, public in keys.items():
            if key in revoked:
                raise AdmissionError("revoked_client", f"client key {key} was revoked")
            if key not in clients:
                if not self.config.auto_enrol:
                    raise AdmissionError(
                        "unknown_client",
                        f"client key {key} is not enrolled; enrol it first "
                        "(Publisher.enrol_client)",
                    )
                self.enrol_client(public, now=when)
        sha = hashlib.sha256(files[ADAPTER_FILE]).hexdigest()
        entry = Entry(
            adapter_sha256=sha,
            client=keyid,
            client_key=manifest.public_key_bytes,
            admitted=when,
            files={n: FileInfo(hashlib.sha256(files[n]).hexdigest(), len(files[n])) for n in files},
            contributors=None if contributors is None else tuple(sorted(contributors)),
        )
        if sha in entries:
            if entries[sha].files == entry.files:
                return sha  # the same export again (e.g. a retried round): nothing to do
            raise AdmissionError(
                "duplicate_adapter", f"adapter weights {sha[:16]} are already listed"
            )
        verify_entry(
            entry, files, tensor_spec=self._spec(entries), federation=self._meta.federation
        )
        for name in entry.files:
            target = self.path / store.adapter_path(sha, name)
            if store.read_optional(target, _CAP, name) != files[name]:
                store.write_file(target, bytes(files[name]))
        self._queue.append({"kind": "adapter", "entry": entry.to_json()})
        return sha

    def _group_contributors(self, files: Mapping[str, bytes], keyid: str) -> dict[str, bytes]:
        """Key id -> public key of every contributor of a group export signed by ``keyid``,
        which must be a server key of the current root (only the server aggregates)."""
        if keyid not in self.root.keys:
            raise AdmissionError(
                "not_server_key",
                f"a group adapter must be signed by a server key; {keyid} is not one of root "
                f"{self.root.version}",
            )
        doc = ContributionsFile.from_bytes(files[CONTRIBUTIONS_FILE])
        records = [verify_contribution(c, CONTRIBUTIONS_FILE) for c in doc.contributions]
        return {r.client: r.client_key for r in records}

    # ----------------------------------------------------------------- publishing
    def publish(self, *, now: datetime | None = None) -> PublishedVersion:
        """Sign and commit version N+1 with everything staged (also refreshes the expiry)."""
        when = max(_now(now), self._meta.issued)  # issue times never go back
        clients, revoked, entries = self._queue.apply(self._meta)
        old = {e.adapter_sha256 for e in self._meta.entries}
        meta = RegistryMetadata(
            version=self._meta.version + 1,
            root_version=self._roots[-1].version,
            issued=when,
            expires=when + self.config.expires_after,
            previous=(self._meta.version, hashlib.sha256(self._meta_bytes).hexdigest()),
            clients=clients,
            revoked=revoked,
            tensor_spec=self._spec(entries),
            federation=self._meta.federation,
            entries=tuple(entries.values()),
        )
        data = sign_envelope(REGISTRY_TYPE, meta.to_payload(), self._keys)
        # Verify before use: the auditor's checks (threshold, chain, append-only, allow-list).
        verify_version(meta.version, data, self._meta_bytes, self._meta, self._roots)
        for entry in meta.entries:
            if entry.adapter_sha256 not in old:
                self._check_stored(entry)
        store.write_new_file(self.path / store.metadata_path(meta.version), data)
        self._commit(meta, data, when)
        new = {e.adapter_sha256 for e in meta.entries}
        return PublishedVersion(
            version=meta.version,
            root_version=meta.root_version,
            metadata_sha256=hashlib.sha256(data).hexdigest(),
            tree_size=len(self._leaves),
            tree_root=merkle.root_hash(self._leaves).hex(),
            entries=len(meta.entries),
            added=tuple(sorted(new - old)),
            removed=tuple(sorted(old - new)),
        )

    def rotate_root(
        self,
        new_keys: Sequence[bytes],
        threshold: int,
        new_signers: Sequence[EllipticCurvePrivateKey],
        *,
        now: datetime | None = None,
    ) -> PublishedVersion:
        """Rotate server keys (TUF): root N+1 signed by the current signers AND ``new_signers``,
        then publish a version signed by ``new_signers`` under it."""
        when = _now(now)
        current = self._roots[-1]
        new = make_root(
            current.version + 1, new_keys, threshold, when, when + self.config.root_expires_after
        )
        data = sign_root(new, [*self._keys, *new_signers])
        verify_root_update(current, data, store.root_path(new.version))
        store.write_new_file(self.path / store.root_path(new.version), data)
        self._roots.append(new)
        self._keys = list(new_signers)
        return self.publish(now=when)

    # ----------------------------------------------------------------- internals
    def _lock(self) -> int:
        store.ensure_dir(self.path / store.STAGING)
        fd = os.open(self.path / store.STAGING / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RegistryError(
                f"another publisher is writing {self.path}; one at a time"
            ) from None
        return fd

    def _read(self, rel: str) -> bytes | None:
        return store.read_optional(self.path / rel, _CAP, rel)

    def _load(self) -> None:
        n = parse_pointer(store.read_capped(self.path / store.POINTER, 1024, store.POINTER))
        metas = [
            store.read_capped(self.path / store.metadata_path(v), _CAP, f"version {v}")
            for v in range(1, n + 1)
        ]
        self._leaves = [merkle.leaf_hash(d) for d in metas]
        self._meta_bytes = metas[-1]
        self._meta = RegistryMetadata.from_payload(
            _envelope_payload(metas[-1]), store.metadata_path(n)
        )
        root_files: list[bytes] = []
        while (data := self._read(store.root_path(len(root_files) + 1))) is not None:
            root_files.append(data)
        # Roots above the newest version's are a rotation that crashed before its publish.
        self._roots = verify_root_chain(root_files, trusted_version=None, trusted_sha256=None)
        if len(self._roots) > self._meta.root_version + 1:
            raise RegistryError(f"{self.path} has roots beyond the one pending rotation")
        self._queue = StagingQueue(self.path / store.STAGING)

    def _recover(self) -> None:
        """Roll forward a version whose metadata was written before a crash; drop temp files
        of interrupted writes."""
        store.remove_stale_temp_files(self.path)
        v = self._meta.version + 1
        data = self._read(store.metadata_path(v))
        if data is None:
            if self._read(store.tree_head_path(v)) is not None:
                raise RegistryError(f"{store.tree_head_path(v)} exists without its metadata")
            return
        meta, _ = verify_version(v, data, self._meta_bytes, self._meta, self._roots)
        self._commit(meta, data, meta.issued)

    def _commit(self, meta: RegistryMetadata, data: bytes, when: datetime) -> None:
        leaves = [*self._leaves, merkle.leaf_hash(data)]
        root = self._roots[meta.root_version - 1]
        head_path = self.path / store.tree_head_path(meta.version)
        head = self._read(store.tree_head_path(meta.version))
        if head is None:
            head = sign_tree_head(leaves, root, when, self._keys)
            verify_tree_head(head, root, leaves, None)  # verify before use
            store.write_new_file(head_path, head)
        else:
            verify_tree_head(head, root, leaves, None)
        store.write_file(self.path / store.POINTER, pointer_bytes(meta.version))  # commit point
        self._leaves, self._meta, self._meta_bytes = leaves, meta, data
        self._queue.clear()

    def _check_stored(self, entry: Entry) -> None:
        """The staged files are still on disk with their lengths (they were verified and
        fsynced at staging; a full re-hash here would double the cost of a publish)."""
        for name, info in entry.files.items():
            path = self.path / store.adapter_path(entry.adapter_sha256, name)
            if not path.is_file() or path.stat().st_size != info.length:
                raise RegistryError(
                    f"staged adapter {entry.adapter_sha256[:16]}: {name} is missing or changed on "
                    "disk; stage the export again"
                )

    def _spec(self, entries: Mapping[str, Entry]) -> Mapping[str, TensorSpec] | None:
        """The tensor spec to sign: the registry's, else the config's, else (once there is an
        adapter) the layout of the first one, so every later adapter must match it."""
        if self._meta.tensor_spec is not None:
            return self._meta.tensor_spec
        if self.config.tensor_spec is not None or not entries:
            return self.config.tensor_spec
        first = next(iter(entries.values()))
        weights = self._read(store.adapter_path(first.adapter_sha256, ADAPTER_FILE)) or b""
        return check_adapter_weights(weights)

    def _check_config(self) -> None:
        for name in ("tensor_spec", "federation"):
            mine, signed = getattr(self.config, name), getattr(self._meta, name)
            if mine is not None and signed is not None and _plain(mine) != _plain(signed):
                raise ConfigError(
                    f"PublisherConfig.{name} differs from the one this registry already signed; "
                    "a registry keeps one; start a new registry for another model"
                )


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _envelope_payload(data: bytes) -> bytes:
    return parse_envelope(data, REGISTRY_TYPE, "registry metadata").payload
