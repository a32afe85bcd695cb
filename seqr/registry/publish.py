"""The publisher: stages admitted adapters durably and publishes signed registry versions.

A registry is a TUF repository (layout.py) written with python-tuf's Metadata API. One
publisher at a time holds an flock on the registry folder itself (released by the kernel when
the process dies, even by SIGKILL; unlike a lock file, it cannot be deleted from under it).
Every operation re-reads the committed state from disk, so a publish that failed half-way
(a full disk, a crash) is simply rolled forward by the next one (``_recover``): nothing
admitted is lost and nothing signed is signed twice with different content.

Before anything is staged the publisher checks that its keys are keys of the newest root and
meet its threshold, so a command given the wrong key fails before it changes anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from seqr.core import signing
from seqr.core.errors import AdmissionError, ConfigError, FormatError, KeyFileError, RegistryError
from seqr.core.manifest import (
    ADAPTER_WEIGHTS_NAME,
    MANIFEST_NAME,
    NORM_STATS_NAME,
    verify_export_files,
)
from seqr.registry import commit, layout, repository, roles, staging, store
from seqr.registry.adapter_check import check_adapter_weights
from seqr.registry.config import PublisherConfig
from seqr.registry.contributions import verify_contributions
from seqr.registry.entries import EXPORT_FILES, GROUP_FILES, verify_adapter
from seqr.registry.metadata import CONTRIBUTIONS_FILE, AdapterRecord, RegistryDocument
from seqr.registry.staging import RegistryState, StagedAdapter, StagingQueue

__all__ = ["Publisher", "PublishedVersion"]

MAX_REASON_CHARS = 1000


@dataclass(frozen=True)
class PublishedVersion:
    """What one publish produced (for logs and the ServerApp's reply)."""

    version: int  # targets version (= size of the transparency log)
    root_version: int
    targets_sha256: str
    tree_size: int
    tree_root: str
    entries: int
    added: tuple[str, ...]  # adapter ids new in this version
    removed: tuple[str, ...]  # adapter ids dropped with a revoked client


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


class Publisher:
    """Single writer of one registry folder. Use ``Publisher.create`` for a new registry."""

    def __init__(
        self, path: Path, signing_keys: Sequence[Any], config: PublisherConfig | None = None
    ) -> None:
        self.path = Path(path)
        self.config = config or PublisherConfig()
        self._lock_fd: int | None = commit.lock_registry(self.path)
        try:
            self._signers = [roles.signer_for(k) for k in signing_keys]
            self._queue = StagingQueue(self.path / layout.STAGING)
            store.remove_stale_temp_files(self.path)
            roles.check_signers(self._signers, repository.load_roots(self.path)[-1].signed)
            self._recover(_now(None))
            self._check_config()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- life cycle
    @classmethod
    def create(
        cls,
        path: Path,
        signing_keys: Sequence[Any],
        *,
        root_keys: Sequence[bytes] | None = None,
        threshold: int = 1,
        config: PublisherConfig | None = None,
        now: datetime | None = None,
    ) -> Publisher:
        """Create a registry (root 1 with ``root_keys``, default the signing keys' public keys,
        k-of-n ``threshold``, and an empty signed version 1), then open it.

        The registry is built in a temporary folder next to ``path`` and renamed into place,
        so a failed create leaves nothing behind; ``path`` must not exist or be empty."""
        path, config, when = Path(path), config or PublisherConfig(), _now(now)
        if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
            raise RegistryError(
                f"{path} already exists and is not an empty folder; a registry is created in "
                "a new folder (choose another --registry)"
            )
        signers = [roles.signer_for(k) for k in signing_keys]
        keys = (
            [roles.tuf_key(k) for k in root_keys] if root_keys else [s.public_key for s in signers]
        )
        root = roles.new_root(keys, threshold, when + config.root_expires)
        store.ensure_dir(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            data = roles.sign(root, signers)
            roles.check_signed(root.signed, Root.type, roles.parse(data, Root, "root"), "root 1")
            store.write_new_file(tmp / layout.METADATA / layout.root_name(1), data)
            state = RegistryState(RegistryDocument(config.federation, config.tensor_spec), {})
            targets = repository.build_targets(tmp, state, 1, when + config.targets_expires)
            targets_data = repository.write_role(tmp, root.signed, signers, targets)
            commit.write_commit(tmp, root.signed, signers, config, when, targets_data, [], None)
            store.ensure_dir(tmp / layout.STAGING)
            if path.exists():
                path.rmdir()  # the empty folder we checked above
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, signing_keys, config)

    def close(self) -> None:
        """Release the single-writer lock (the object is unusable afterwards)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    def committed(self) -> repository.Committed:
        return repository.load(self.path)

    @property
    def version(self) -> int:
        return self.committed().targets.signed.version

    @property
    def document(self) -> RegistryDocument:
        """The registry document of the newest published version."""
        return self.committed().state.document

    @property
    def root(self) -> Root:
        return repository.load_roots(self.path)[-1].signed

    @property
    def pending(self) -> int:
        """Staged operations the next publish will apply."""
        return len(self._queue)

    def _staged_state(self) -> RegistryState:
        return self._pinned(staging.apply(self.committed().state, self._queue.records()))

    def _pinned(self, state: RegistryState) -> RegistryState:
        """Without a tensor spec from the federation, the first adapter's layout becomes the
        registry's, so every later adapter must match it."""
        if state.document.tensor_spec is not None or not state.adapters:
            return state
        first = state.adapters[min(state.adapters)]
        length, sha = first.files[ADAPTER_WEIGHTS_NAME]
        info = TargetFile(
            length,
            {"sha256": sha},
            layout.adapter_target(first.record.adapter_id, ADAPTER_WEIGHTS_NAME),
        )
        spec = check_adapter_weights(repository.read_target(self.path, info, length))
        return replace(state, document=replace(state.document, tensor_spec=spec))

    # ----------------------------------------------------------------- staging
    def enrol_client(self, public_key: bytes, *, now: datetime | None = None) -> str:
        """Allow-list a client key (takes effect at the next publish); its fingerprint.
        Enrolling a key already enrolled stages nothing."""
        try:
            keyid = signing.fingerprint(bytes(public_key))
        except KeyFileError as exc:
            raise AdmissionError("bad_client_key", str(exc)) from None
        document = self._staged_state().document
        if keyid in document.revoked:
            raise AdmissionError("revoked_client", f"client key {keyid} was revoked for good")
        if keyid not in document.clients:
            self._queue.append(staging.enrol_record(bytes(public_key), _now(now)))
        return keyid

    def revoke_client(self, keyid: str, reason: str, *, now: datetime | None = None) -> None:
        """Revoke a client key for good; its adapters leave the registry at the next publish."""
        if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON_CHARS:
            raise ConfigError(f"a revocation needs a reason of 1-{MAX_REASON_CHARS} characters")
        document = self._staged_state().document
        if keyid in document.revoked:
            return
        if keyid not in document.clients:
            raise RegistryError(f"client key {keyid} is not enrolled; nothing to revoke")
        self._queue.append(staging.revoke_record(keyid, reason, _now(now)))

    def stage_adapter(self, files: Mapping[str, bytes], *, admitted: datetime | None = None) -> str:
        """Durably queue an admitted adapter (its signed export files) for the next publish.

        Runs every check a client's audit runs on the files first (verify before use) and
        returns the adapter's id (SHA-256 of its weights). AdmissionError for an unknown (when
        auto_enrol is off), revoked or duplicate adapter."""
        group = set(files) == set(GROUP_FILES)
        if set(files) != set(EXPORT_FILES) and not group:
            raise FormatError(
                f"an adapter export holds exactly {', '.join(EXPORT_FILES)} (a group adapter "
                f"also {CONTRIBUTIONS_FILE}); got {', '.join(sorted(map(str, files)))[:300]}"
            )
        when = _now(admitted)
        manifest = verify_export_files(files)
        root = self.root
        keys: dict[str, bytes] = {manifest.fingerprint: manifest.public_key_bytes}
        contributors = None
        if group:
            if not roles.is_root_key(root, manifest.public_key_bytes):
                raise AdmissionError(
                    "not_server_key",
                    f"a group adapter must be signed by a server key; {manifest.fingerprint} "
                    f"is not one of root {root.version}'s keys",
                )
            report = verify_contributions(
                files[CONTRIBUTIONS_FILE],
                group=manifest.name,
                adapter_weights=files[ADAPTER_WEIGHTS_NAME],
                stats_bytes=files[NORM_STATS_NAME],
                example_count=manifest.example_count,
            )
            keys = {r.client: r.client_key for r in report.records}
            contributors = tuple(sorted(keys))
        state = self._staged_state()
        for keyid, public in keys.items():
            if keyid in state.document.revoked:
                raise AdmissionError("revoked_client", f"client key {keyid} was revoked")
            if keyid not in state.document.clients:
                if not self.config.auto_enrol:
                    raise AdmissionError(
                        "unknown_client",
                        f"client key {keyid} is not enrolled; the operator enrols it with "
                        "`seqr server enrol`",
                    )
                self.enrol_client(public, now=when)
        adapter_id = hashlib.sha256(files[ADAPTER_WEIGHTS_NAME]).hexdigest()
        info = {n: (len(b), hashlib.sha256(b).hexdigest()) for n, b in files.items()}
        existing = state.adapters.get(adapter_id)
        if existing is not None:
            if existing.files == info:
                return adapter_id  # the same export again (e.g. a retried round)
            raise AdmissionError("duplicate_adapter", f"weights {adapter_id[:16]} are listed")
        record = AdapterRecord(
            adapter_id=adapter_id,
            name=manifest.name,
            client=manifest.fingerprint,
            admitted=when,
            manifest_sha256=info[MANIFEST_NAME][1],
            stats_sha256=info[NORM_STATS_NAME][1],
            files=tuple(sorted(files)),
            contributors=contributors,
        )
        verify_adapter(
            record,
            files,
            self._staged_state().document,
            is_server_key=lambda public: roles.is_root_key(root, public),
        )
        for name, data in files.items():
            repository.write_target(self.path, layout.adapter_target(adapter_id, name), data)
        self._queue.append(staging.adapter_record(StagedAdapter(record, info)))
        return adapter_id

    # ----------------------------------------------------------------- publishing
    def publish(self, *, now: datetime | None = None, force: bool = False) -> PublishedVersion:
        """Commit what is staged as the next version and refresh what is close to expiry
        (timestamp always; snapshot, targets and root when they would expire first)."""
        when = _now(now)
        self._recover(when)
        before = self.committed()
        records = self._queue.records()
        state = self._pinned(staging.apply(before.state, records))
        root = self._renew_root(before, when)
        targets_due = before.targets.signed.expires < when + self.config.snapshot_expires
        rotated = root.version != before.root.version
        targets_data = None
        if force or rotated or targets_due or state != before.state:
            version = before.targets.signed.version + 1
            targets = repository.build_targets(
                self.path, state, version, when + self.config.targets_expires
            )
            targets_data = repository.write_role(self.path, root, self._signers, targets)
        leaves = repository.read_leaves(self.path, before.targets.signed.version)
        commit.write_commit(
            self.path, root, self._signers, self.config, when, targets_data, leaves, before
        )
        if records:
            self._queue.clear(records[-1][0])
        return self._published(before)

    def rotate_root(
        self,
        new_keys: Sequence[bytes],
        threshold: int,
        new_signers: Sequence[Any],
        *,
        now: datetime | None = None,
    ) -> PublishedVersion:
        """Rotate server keys: root N+1 signed by a threshold of root N AND of itself (spec
        5.3.4), then every other role re-signed by ``new_signers`` under it."""
        when = _now(now)
        current = self.root
        signers = [roles.signer_for(k) for k in new_signers]
        keys = [roles.tuf_key(k) for k in new_keys]
        new = roles.new_root(keys, threshold, when + self.config.root_expires)
        new.signed.version = current.version + 1
        self._write_root(new, current, [*self._signers, *signers])
        self._signers = signers
        roles.check_signers(self._signers, new.signed)
        return self.publish(now=when, force=True)

    # ----------------------------------------------------------------- internals
    def _renew_root(self, before: repository.Committed, when: datetime) -> Root:
        """Re-sign the root (same keys, next version) once it would expire before the next
        snapshot; clients walk the chain of roots, so it is an ordinary rotation."""
        root = before.root
        if root.expires >= when + self.config.snapshot_expires:
            return root
        renewed = Metadata(Root.from_dict(root.to_dict()))
        renewed.signed.version = root.version + 1
        renewed.signed.expires = when + self.config.root_expires
        self._write_root(renewed, root, self._signers)
        return renewed.signed

    def _write_root(self, new: Metadata[Root], current: Root, signers: Sequence[Any]) -> None:
        data = roles.sign_next_root(new, current, signers)
        store.write_new_file(
            self.path / layout.METADATA / layout.root_name(new.signed.version), data
        )

    def _recover(self, when: datetime) -> None:
        """Roll forward a publish that stopped after writing targets or a snapshot but before
        the commit point (timestamp.json): complete it rather than re-sign, since two signed
        files for one version would look like a fork."""
        before = self.committed()
        root = before.root
        name = layout.versioned_name("targets", before.targets.signed.version + 1)
        data = repository.read_metadata(self.path, name)
        snap = layout.versioned_name("snapshot", before.snapshot.signed.version + 1)
        if data is None and repository.read_metadata(self.path, snap) is None:
            return
        if data is not None:
            roles.check_signed(root, Targets.type, roles.parse(data, Targets, name), name)
        leaves = repository.read_leaves(self.path, before.targets.signed.version)
        commit.write_commit(self.path, root, self._signers, self.config, when, data, leaves, before)

    def _check_config(self) -> None:
        document = self.document
        for name in ("tensor_spec", "federation"):
            mine, signed = getattr(self.config, name), getattr(document, name)
            if mine is not None and signed is not None and _plain(mine) != _plain(signed):
                raise ConfigError(
                    f"this federation's {name.replace('_', ' ')} differs from the one the "
                    "registry already signed; a registry keeps one (start a new registry)"
                )

    def _published(self, before: repository.Committed) -> PublishedVersion:
        after = self.committed()
        old, new = set(before.state.adapters), set(after.state.adapters)
        targets_data = repository.read_metadata(
            self.path, layout.versioned_name("targets", after.targets.signed.version)
        )
        return PublishedVersion(
            version=after.targets.signed.version,
            root_version=after.root.version,
            targets_sha256=hashlib.sha256(targets_data or b"").hexdigest(),
            tree_size=after.head.tree_size,
            tree_root=after.head.root_hash.hex(),
            entries=len(new),
            added=tuple(sorted(new - old)),
            removed=tuple(sorted(old - new)),
        )


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value
