"""``audit_registry``: what a client runs before routing with a downloaded registry.

A thin reading layer over the pure verification core (verify.py, entries.py): it reads each
file with a byte cap (endless data), hands the bytes over, checks every adapter folder in a
small thread pool (hashlib and numpy release the GIL), and writes the trusted state
atomically ONLY when everything passed. On any failure it raises and leaves the state file
exactly as it was (python-tuf: a rejected update never changes what is trusted).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from seqr.core.errors import FormatError, RegistryError, SeqrError
from seqr.registry import store
from seqr.registry.adapter_check import describe_layout_difference
from seqr.registry.codec import format_time
from seqr.registry.config import AuditConfig
from seqr.registry.entries import EntryReport, verify_entry
from seqr.registry.metadata import Entry, parse_pointer
from seqr.registry.trusted_state import TrustedState, load_trusted_state, save_trusted_state
from seqr.registry.verify import (
    RegistryFiles,
    VerifiedRegistry,
    peek_root_version,
    verify_metadata,
)

__all__ = ["AuditReport", "audit_registry", "read_registry_files"]

MAX_LISTED_FAILURES = 20


@dataclass(frozen=True)
class AuditReport:
    """A registry that passed every check, and what the audit trusted."""

    path: str
    version: int
    root_version: int
    threshold: int
    server_keys: tuple[str, ...]
    signed_by: tuple[str, ...]
    issued: datetime
    expires: datetime
    tree_size: int
    tree_root: str
    first_use: bool  # no trusted state before: root 1 was trusted on first use (or pinned)
    trusted_version_before: int | None
    trusted_state_updated: bool
    clients: int
    revoked: int
    entries: tuple[EntryReport, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "path": self.path,
            "version": self.version,
            "root_version": self.root_version,
            "threshold": self.threshold,
            "server_keys": list(self.server_keys),
            "signed_by": list(self.signed_by),
            "issued": format_time(self.issued),
            "expires": format_time(self.expires),
            "tree_size": self.tree_size,
            "tree_root": self.tree_root,
            "first_use": self.first_use,
            "trusted_version_before": self.trusted_version_before,
            "trusted_state_updated": self.trusted_state_updated,
            "clients": self.clients,
            "revoked": self.revoked,
            "seconds": round(self.seconds, 3),
            "entries": [
                {
                    "adapter_sha256": e.adapter_sha256,
                    "manifest_sha256": e.manifest_sha256,
                    "client": e.client,
                    "name": e.name,
                    "admitted": format_time(e.admitted),
                    "size_bytes": e.size_bytes,
                    "tensors": len(e.layout),
                    "ok": True,
                    **(
                        {
                            "contributors": list(e.contributors),
                            "group_rounds": e.group_rounds,
                            "examples_by_client": dict(e.examples_by_client or {}),
                        }
                        if e.contributors
                        else {}
                    ),
                }
                for e in self.entries
            ],
        }


def read_registry_files(path: Path, config: AuditConfig) -> RegistryFiles:
    """Read latest.json, every version, the roots the newest one needs and its tree head."""
    path = Path(path)
    pointer = store.read_capped(path / store.POINTER, config.max_pointer_bytes, store.POINTER)
    n = parse_pointer(pointer)
    if n > config.max_versions:
        raise FormatError(f"latest.json names version {n}, over max_versions {config.max_versions}")
    metadata = [
        store.read_capped(path / store.metadata_path(v), config.max_metadata_bytes, f"version {v}")
        for v in range(1, n + 1)
    ]
    r = peek_root_version(metadata[-1])
    if r > config.max_roots:
        raise FormatError(f"newest version names root {r}, over max_roots {config.max_roots}")
    roots = [
        store.read_capped(path / store.root_path(i), config.max_root_bytes, f"root {i}")
        for i in range(1, r + 1)
    ]
    head = store.read_capped(
        path / store.tree_head_path(n), config.max_tree_head_bytes, f"tree head {n}"
    )
    return RegistryFiles(pointer=pointer, roots=roots, metadata=metadata, tree_head=head)


def _read_entry(path: Path, entry: Entry, config: AuditConfig) -> dict[str, bytes]:
    files = {}
    for name, info in entry.files.items():
        cap = config.file_cap(name)
        if info.length > cap:
            raise RegistryError(
                f"adapter {entry.adapter_sha256[:16]}: {name} is declared as {info.length} bytes, "
                f"over the limit of {cap} (endless data)"
            )
        # Read at most one byte past the signed length: a longer file is endless data.
        rel = store.adapter_path(entry.adapter_sha256, name)
        try:
            data = store.read_optional(path / rel, info.length, rel)
        except FormatError as exc:
            raise RegistryError(f"adapter {entry.adapter_sha256[:16]}: {exc}") from None
        if data is not None:
            files[name] = data
    return files


def _check_entry(
    path: Path, verified: VerifiedRegistry, entry: Entry, config: AuditConfig
) -> EntryReport | str:
    meta = verified.metadata
    try:
        files = _read_entry(path, entry, config)
        return verify_entry(entry, files, tensor_spec=meta.tensor_spec, federation=meta.federation)
    except SeqrError as exc:
        return str(exc)


def audit_registry(
    path: Path | str,
    trusted_state_path: Path | str | None = None,
    now: datetime | None = None,
    *,
    config: AuditConfig | None = None,
) -> AuditReport:
    """Verify the registry at ``path`` offline; update the trusted state only on success.

    Raises RegistryError (RollbackError, FreezeError, ForkError for those attacks),
    SignatureError or FormatError, all SeqrError, with a message naming what failed.
    Without ``trusted_state_path`` nothing is remembered (every call is a first use).
    """
    started = time.perf_counter()
    path, config = Path(path), config or AuditConfig()
    now = (now or datetime.now(UTC)).astimezone(UTC)
    state_path = None if trusted_state_path is None else Path(trusted_state_path)
    trusted = None if state_path is None else load_trusted_state(state_path)
    files = read_registry_files(path, config)
    verified = verify_metadata(
        files, trusted, now, expected_root_sha256=config.expected_root_sha256
    )
    entries = verified.metadata.entries
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        results = list(pool.map(lambda e: _check_entry(path, verified, e, config), entries))
    failures = [r for r in results if isinstance(r, str)]
    reports = tuple(r for r in results if isinstance(r, EntryReport))
    if not failures and verified.metadata.tensor_spec is None and reports:
        # No signed spec: all adapters of one registry must still share one layout.
        for report in reports[1:]:
            diff = describe_layout_difference(report.layout, reports[0].layout)
            if diff:
                failures.append(
                    f"adapter {report.adapter_sha256[:16]} has another tensor layout than "
                    f"adapter {reports[0].adapter_sha256[:16]}: {diff}"
                )
    if failures:
        listed = "\n  - ".join(failures[:MAX_LISTED_FAILURES])
        more = len(failures) - MAX_LISTED_FAILURES
        raise RegistryError(
            f"registry version {verified.metadata.version}: {len(failures)} of {len(entries)} "
            f"adapter(s) failed the audit:\n  - {listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    if state_path is not None:
        save_trusted_state(state_path, verified.state)
    return _report(path, verified, trusted, reports, state_path is not None, started)


def _report(
    path: Path,
    verified: VerifiedRegistry,
    trusted: TrustedState | None,
    reports: tuple[EntryReport, ...],
    saved: bool,
    started: float,
) -> AuditReport:
    meta, root, head = verified.metadata, verified.root, verified.tree_head
    return AuditReport(
        path=str(path),
        version=meta.version,
        root_version=root.version,
        threshold=root.threshold,
        server_keys=tuple(sorted(root.keys)),
        signed_by=tuple(sorted(verified.signed_by)),
        issued=meta.issued,
        expires=meta.expires,
        tree_size=head.tree_size,
        tree_root=head.root_hash.hex(),
        first_use=verified.first_use,
        trusted_version_before=None if trusted is None else trusted.registry_version,
        trusted_state_updated=saved,
        clients=len(meta.clients),
        revoked=len(meta.revoked),
        entries=reports,
        seconds=time.perf_counter() - started,
    )
