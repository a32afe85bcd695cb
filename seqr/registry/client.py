"""A registry client's refresh: python-tuf's ngclient, then seqr's own checks, then commit.

Steps, all inside one locked session on a copy of the trusted state (trust.py):

1. ngclient ``Updater.refresh()``: the root chain, timestamp, snapshot and targets with every
   check of the TUF client workflow (spec 5.3-5.6: signatures and thresholds, rollback,
   freeze, mix-and-match, fast-forward, endless data). First use: root 1 is pinned by its
   SHA-256 (``expected_root_sha256``) or trusted on first use, as the report says.
2. seqr's checks on that metadata: no timestamp or snapshot may expire further ahead than
   ``max_freeze`` (a publisher clock far in the future would remove the freeze bound), each
   root key counts once, and the signed tree head must extend the log this client trusts
   (RFC 9162, log.py; every new targets version is fetched and becomes a leaf).
3. Every target file is fetched (or read from the folder) within its signed length, checked
   against its signed hash, and each adapter is verified by entries.py.
4. Only then is anything kept: the new state is committed and, for a pull, the mirror gets the
   new files (mirror.py: targets first, timestamp.json last, so the mirror is always a
   consistent repository). On any failure nothing local changes. TUF failures are reported
   as the attack they stop (tuf_errors.py).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater, UpdaterConfig

from seqr.core.errors import ForkError, FreezeError, RegistryError, RollbackError, SeqrError
from seqr.core.manifest import Manifest
from seqr.registry import layout, log, roles, store
from seqr.registry.audit import AuditReport, VerifiedAdapter, VerifiedRegistry
from seqr.registry.codec import format_time
from seqr.registry.config import AuditConfig
from seqr.registry.entries import EntryReport, verify_adapter
from seqr.registry.fetch import Source, source_for
from seqr.registry.metadata import AdapterRecord, RegistryDocument
from seqr.registry.mirror import write_mirror
from seqr.registry.repository import record_of
from seqr.registry.trust import TrustSession, TrustStore
from seqr.registry.tuf_errors import registry_error

__all__ = ["refresh", "MIRROR_STATE"]

MIRROR_STATE = ".seqr"  # a pulled mirror keeps its client's trusted state here
_REVOKED = "revoked.txt"  # fingerprints of every client key this client saw revoked
MAX_LISTED_FAILURES = 20


def refresh(
    location: str | Path,
    trusted_state: str | Path | None,
    config: AuditConfig,
    *,
    mirror: Path | None,
) -> VerifiedRegistry:
    started = time.perf_counter()
    source = source_for(location)
    kept = trusted_state is not None
    # A failed first use leaves nothing behind: folders this call creates go if it fails.
    created = [p for p in (mirror, trusted_state) if p is not None and not Path(p).exists()]
    try:
        return _refresh(source, trusted_state, config, mirror, kept, started)
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _refresh(
    source: Source,
    trusted_state: str | Path | None,
    config: AuditConfig,
    mirror: Path | None,
    kept: bool,
    started: float,
) -> VerifiedRegistry:
    with ExitStack() as stack:
        if trusted_state is None:
            trusted_state = stack.enter_context(tempfile.TemporaryDirectory(prefix="seqr-trust-"))
        trust = TrustStore(Path(trusted_state))
        session = stack.enter_context(trust.session())
        try:
            result = _Refresh(source, session, config, mirror).run()
        except SeqrError as exc:  # FormatError, SignatureError, ...: the audit failed
            raise exc if isinstance(exc, RegistryError) else RegistryError(str(exc)) from None
        if mirror is not None:
            write_mirror(
                mirror,
                targets=result.new_targets,
                roots=result.roots,
                metadata=result.new_metadata,
                history=result.history,
                snapshot=(
                    layout.versioned_name("snapshot", result.snapshot.signed.version),
                    result._read_tuf("snapshot.json"),
                ),
                timestamp=result._read_tuf("timestamp.json"),
            )
        for scratch in ("downloads", "history"):  # the trusted state keeps metadata only
            shutil.rmtree(session.work / scratch, ignore_errors=True)
        session.commit()
    report = result.report(source, trusted_state_kept=kept, started=started)
    return VerifiedRegistry(report, result.document, tuple(result.adapters))


class _Refresh:
    def __init__(
        self, source: Source, session: TrustSession, config: AuditConfig, mirror: Path | None
    ) -> None:
        self.source, self.session, self.config, self.mirror = source, session, config, mirror
        self.tuf_dir = session.work / "tuf"
        self.downloads = session.work / "downloads"
        self.new_metadata: dict[str, bytes] = {}  # mirror files to write on commit
        self.history: dict[str, Path] = {}  # older targets versions fetched for the log
        self.new_targets: dict[str, Path] = {}  # stored target name -> downloaded file
        self.downloaded_bytes = 0
        self.adapters: list[VerifiedAdapter] = []

    # ---------------------------------------------------------------- the steps
    def run(self) -> _Refresh:
        now = datetime.now(UTC)
        store.ensure_dir(self.tuf_dir)
        updater = self._updater()
        try:
            updater.refresh()
        except Exception as exc:  # noqa: BLE001 - every TUF failure becomes a RegistryError
            raise registry_error(exc) from None
        self.updater = updater
        self.roots = self._roots()
        self.timestamp = self._persisted("timestamp.json", Timestamp)
        self.snapshot = self._persisted("snapshot.json", Snapshot)
        self.targets_bytes = self._read_tuf("targets.json")
        self.targets = roles.parse(self.targets_bytes, Targets, "targets.json")
        self._check_horizon(now)
        roles.check_root_keys(self.root, f"root {self.root.version}")
        self.log_before = self._log_state()
        head = log.TreeHead.from_field(
            self.snapshot.signed.unrecognized_fields.get(layout.LOG_FIELD), "snapshot log head"
        )
        self.log_after = log.check_extension(
            self.log_before,
            self._new_leaves(),
            head,
            now=now,
            max_clock_skew=self.config.max_clock_skew,
        )
        self.head = head
        self.document = RegistryDocument.from_bytes(self._target(layout.REGISTRY_TARGET))
        revoked = self._check_revocations()
        self._verify_adapters()
        store.write_file(self.session.work / "log.json", self.log_after.to_bytes())
        store.write_file(self.session.work / _REVOKED, "\n".join(sorted(revoked)).encode())
        return self

    def _check_revocations(self) -> set[str]:
        """A revocation is for good: every key this client ever saw revoked stays revoked."""
        data = store.read_optional(self.session.work, _REVOKED, 64 * 1024 * 1024, "revocations")
        seen = set(data.decode("ascii", "replace").split()) if data else set()
        undone = sorted(k for k in seen if k not in self.document.revoked)
        if undone:
            raise RegistryError(
                f"client key(s) {undone[:3]} were revoked in a version this client trusted, "
                "but this version no longer revokes them: revocations cannot be undone"
            )
        return seen | set(self.document.revoked)

    def _updater(self) -> Updater:
        root_history = self.tuf_dir / "root_history"
        if root_history.is_dir():
            newest = max(int(p.name.split(".")[0]) for p in root_history.glob("*.root.json"))
            bootstrap = store.read_capped(
                root_history, f"{newest}.root.json", self.config.max_root_bytes, "trusted root"
            )
        else:
            bootstrap = self._first_root()
        caps = UpdaterConfig(
            max_root_rotations=self.config.max_root_rotations,
            root_max_length=self.config.max_root_bytes,
            timestamp_max_length=self.config.max_timestamp_bytes,
            snapshot_max_length=self.config.max_snapshot_bytes,
            targets_max_length=self.config.max_targets_bytes,
            app_user_agent="seqr",
        )
        try:
            return Updater(
                str(self.tuf_dir),
                self.source.metadata_url,
                str(self.downloads),
                self.source.targets_url,
                self.source.fetcher,
                caps,
                bootstrap=bootstrap,
            )
        except Exception as exc:  # noqa: BLE001
            raise registry_error(exc) from None

    def _first_root(self) -> bytes:
        """Root 1 on first use: pinned by hash, or trusted on first use."""
        try:
            data = self.source.fetcher.download_bytes(
                f"{self.source.metadata_url}{layout.root_name(1)}", self.config.max_root_bytes
            )
        except Exception as exc:  # noqa: BLE001
            raise registry_error(exc, "root 1 (metadata/1.root.json)") from None
        pin = self.config.expected_root_sha256
        if pin is not None and hashlib.sha256(data).hexdigest() != pin:
            raise RegistryError(
                f"metadata/1.root.json has SHA-256 {hashlib.sha256(data).hexdigest()}, not the "
                f"pinned {pin}: this is not the registry you were told to trust"
            )
        return data

    def _roots(self) -> list[bytes]:
        folder = self.tuf_dir / "root_history"
        versions = sorted(int(p.name.split(".")[0]) for p in folder.glob("*.root.json"))
        return [self._read_tuf(f"root_history/{v}.root.json") for v in versions]

    @property
    def root(self) -> Root:
        return roles.parse(self.roots[-1], Root, "root").signed

    def _read_tuf(self, rel: str) -> bytes:
        return store.read_capped(self.tuf_dir, rel, self.config.max_targets_bytes, rel)

    def _persisted(self, name: str, cls: type[Any]) -> Metadata[Any]:
        return roles.parse(self._read_tuf(name), cls, name)

    def _check_horizon(self, now: datetime) -> None:
        for md in (self.timestamp, self.snapshot):
            if md.signed.expires > now + self.config.max_freeze:
                raise FreezeError(
                    f"{md.signed.type} metadata expires {format_time(md.signed.expires)}, more "
                    f"than {self.config.max_freeze.days} days from now ({format_time(now)}): a "
                    "publisher clock far ahead would let a mirror replay it for that long"
                )

    # ---------------------------------------------------------------- the log
    def _log_state(self) -> log.LogState:
        data = store.read_optional(self.session.work, "log.json", 64 * self.config.max_versions,
                                   "trusted log")  # fmt: skip
        if data is None:
            return log.LogState()
        return log.LogState.from_bytes(data, "trusted log", self.config.max_versions)

    def _new_leaves(self) -> list[bytes]:
        """Leaves of every targets version this client has not seen (the newest one is
        the verified targets.json; older ones are fetched within the targets cap)."""
        version, known = self.targets.signed.version, len(self.log_before.leaves)
        if version > self.config.max_versions:
            raise RegistryError(f"targets version {version} is over max_versions")
        if version < known:
            raise RollbackError(f"targets version {version} is older than the trusted {known}")
        if version == known:  # nothing new; the same version must be the same file
            if log.leaf_of(self.targets_bytes) != self.log_before.leaves[-1]:
                raise ForkError(f"targets version {version} differs from the one trusted before")
            return []
        leaves = []
        for v in range(known + 1, version):
            name = layout.versioned_name("targets", v)
            leaves.append(self._leaf_of_old_version(name))
        leaves.append(log.leaf_of(self.targets_bytes))
        self.new_metadata[layout.versioned_name("targets", version)] = self.targets_bytes
        return leaves

    def _leaf_of_old_version(self, name: str) -> bytes:
        """Hash an older targets version as it streams in (bounded by the targets cap, never
        held in memory); the signed tree head then vouches for the whole history."""
        url = f"{self.source.metadata_url}{name}"
        digest = hashlib.sha256(b"\x00")  # RFC 9162 leaf hash, computed incrementally
        try:
            with self.source.fetcher.download_file(url, self.config.max_targets_bytes) as f:
                kept = self.session.work / "history" / name if self.mirror is not None else None
                if kept is not None:
                    store.ensure_dir(kept.parent)
                with open(kept, "wb") if kept is not None else nullcontext() as out:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                        if out is not None:
                            out.write(chunk)
        except Exception as exc:  # noqa: BLE001
            raise registry_error(exc, name) from None
        if kept is not None:
            self.history[name] = kept
        return digest.digest()

    def _target(self, path: str, cap: int | None = None) -> bytes:
        info = self.targets.signed.targets.get(path)
        if info is None:
            raise RegistryError(f"the targets metadata lists no {path}")
        return self._target_bytes(
            info, cap if cap is not None else self.config.max_small_file_bytes
        )

    def _target_bytes(self, info: TargetFile, cap: int) -> bytes:
        if info.length > cap:
            raise RegistryError(
                f"{info.path} is declared as {info.length} bytes, over the limit of {cap} "
                "(endless data)"
            )
        stored = layout.stored_target_name(info.path, info.hashes.get("sha256", ""))
        rel = f"{layout.TARGETS}/{stored}"
        data = None
        for folder in (self.source.folder, self.mirror):
            if folder is not None and data is None:
                data = store.read_optional(folder, rel, info.length, info.path)
        if data is None:  # fetched through ngclient: bounded by and checked against the length
            try:
                path = Path(
                    self.updater.download_target(
                        info, str(self.downloads / stored.replace("/", "_"))
                    )
                )
            except Exception as exc:  # noqa: BLE001
                raise registry_error(exc, info.path) from None
            data = store.read_capped(path.parent, path.name, info.length, info.path)
            self.new_targets[stored] = path
            self.downloaded_bytes += len(data)
        try:
            info.verify_length_and_hashes(data)
        except exceptions.LengthOrHashMismatchError as exc:
            raise RegistryError(
                f"{info.path} does not match its signed hash or length: {exc}"
            ) from None
        return data

    def _verify_adapters(self) -> None:
        groups: dict[str, dict[str, TargetFile]] = defaultdict(dict)
        for path, info in self.targets.signed.targets.items():
            parsed = layout.parse_adapter_target(path)
            if parsed is not None:
                groups[parsed[0]][parsed[1]] = info
            elif path != layout.REGISTRY_TARGET:
                raise RegistryError(f"the targets metadata lists an unknown file {path!r:.80}")
        jobs = []
        for adapter_id, infos in sorted(groups.items()):
            try:
                record = record_of(infos[_WEIGHTS], layout.adapter_target(adapter_id, _WEIGHTS))
            except (KeyError, SeqrError) as exc:
                raise RegistryError(
                    f"adapter {adapter_id[:16]}: no valid seqr record ({exc})"
                ) from None
            files = {n: self._target_bytes(i, self.config.file_cap(n)) for n, i in infos.items()}
            jobs.append((record, files))
        root = self.root
        with ThreadPoolExecutor(max_workers=self.config.workers) as pool:
            results = list(pool.map(lambda job: _check(job, self.document, root), jobs))
        failures = [r for r in results if isinstance(r, str)]
        if failures:
            listed = "\n  - ".join(failures[:MAX_LISTED_FAILURES])
            more = len(failures) - MAX_LISTED_FAILURES
            raise RegistryError(
                f"registry version {self.targets.signed.version}: {len(failures)} of "
                f"{len(jobs)} adapter(s) failed the audit:\n  - {listed}"
                + (f"\n  ... and {more} more" if more > 0 else "")
            )
        for (record, files), result in zip(jobs, results, strict=True):
            assert not isinstance(result, str)  # noqa: S101 - failures raised above
            entry, manifest = result
            self.adapters.append(VerifiedAdapter(record, entry, manifest, files))

    # ---------------------------------------------------------------- the report
    def report(self, source: Source, *, trusted_state_kept: bool, started: float) -> AuditReport:
        root = self.root
        result = root.get_verification_result(
            Targets.type, self.targets.signed_bytes, self.targets.signatures
        )
        return AuditReport(
            source=source.location,
            version=self.targets.signed.version,
            root_version=root.version,
            threshold=root.roles[Targets.type].threshold,
            server_keys=tuple(sorted(root.keys)),
            signed_by=tuple(sorted(result.signed)),
            expires=self.timestamp.signed.expires,
            snapshot_version=self.snapshot.signed.version,
            tree_size=self.head.tree_size,
            tree_root=self.head.root_hash.hex(),
            first_use=self.session.first_use,
            root_sha256=hashlib.sha256(self.roots[0]).hexdigest(),
            trusted_version_before=len(self.log_before.leaves) or None,
            trusted_state_updated=trusted_state_kept,
            clients=len(self.document.clients),
            revoked=len(self.document.revoked),
            entries=tuple(a.entry for a in self.adapters),
            downloaded_files=len(self.new_targets),
            downloaded_bytes=self.downloaded_bytes,
            seconds=time.perf_counter() - started,
        )


_WEIGHTS = "adapter_model.safetensors"


def _check(
    job: tuple[AdapterRecord, dict[str, bytes]], document: RegistryDocument, root: Root
) -> tuple[EntryReport, Manifest] | str:
    record, files = job
    try:
        return verify_adapter(
            record, files, document, is_server_key=lambda public: roles.is_root_key(root, public)
        )
    except SeqrError as exc:
        return str(exc)
