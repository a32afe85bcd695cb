"""What a registry client gets back from a refresh: the audit report and the verified bytes.

``audit_registry`` and ``pull_registry`` are the two entry points (client.py does the work):
both refresh a trusted state from a source (a URL or a folder) with python-tuf's ngclient,
then run seqr's own checks; ``pull_registry`` also keeps a verified mirror. The adapters come
back as the exact bytes that were verified, and that is what every consumer loads (no second
read of the files, no second checker).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from seqr.core.manifest import Manifest
from seqr.registry.codec import format_time
from seqr.registry.config import AuditConfig
from seqr.registry.entries import EntryReport
from seqr.registry.metadata import AdapterRecord, RegistryDocument

__all__ = [
    "AuditReport",
    "VerifiedAdapter",
    "VerifiedRegistry",
    "audit_registry",
    "pull_registry",
    "trusted_state_for",
]


@dataclass(frozen=True)
class AuditReport:
    """A registry that passed every check, and what the client trusted."""

    source: str
    version: int  # targets version
    root_version: int
    threshold: int
    server_keys: tuple[str, ...]  # TUF key ids of the newest root
    signed_by: tuple[str, ...]  # key ids whose signatures on the targets metadata verified
    expires: datetime  # of the timestamp: the registry must be refreshed before then
    snapshot_version: int
    tree_size: int
    tree_root: str
    first_use: bool  # no trusted state before: root 1 was trusted on first use (or pinned)
    root_sha256: str  # SHA-256 of metadata/1.root.json (what clients pin)
    trusted_version_before: int | None
    trusted_state_updated: bool
    clients: int
    revoked: int
    entries: tuple[EntryReport, ...]
    downloaded_files: int  # target files fetched by this refresh (0 for a folder)
    downloaded_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "source": self.source,
            "version": self.version,
            "root_version": self.root_version,
            "root_sha256": self.root_sha256,
            "threshold": self.threshold,
            "server_keys": list(self.server_keys),
            "signed_by": list(self.signed_by),
            "expires": format_time(self.expires),
            "snapshot_version": self.snapshot_version,
            "tree_size": self.tree_size,
            "tree_root": self.tree_root,
            "first_use": self.first_use,
            "trusted_version_before": self.trusted_version_before,
            "trusted_state_updated": self.trusted_state_updated,
            "clients": self.clients,
            "revoked": self.revoked,
            "downloaded_files": self.downloaded_files,
            "downloaded_bytes": self.downloaded_bytes,
            "seconds": round(self.seconds, 3),
            "entries": [_entry_json(e) for e in self.entries],
        }


def _entry_json(e: EntryReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        "adapter_sha256": e.adapter_sha256,
        "manifest_sha256": e.manifest_sha256,
        "client": e.client,
        "name": e.name,
        "admitted": format_time(e.admitted),
        "size_bytes": e.size_bytes,
        "tensors": len(e.layout),
        "ok": True,
    }
    if e.contributors:
        out["contributors"] = list(e.contributors)
        out["group_rounds"] = e.group_rounds
        out["examples_by_client"] = dict(e.examples_by_client or {})
    return out


@dataclass(frozen=True)
class VerifiedAdapter:
    """One adapter whose files passed the audit, with those exact bytes."""

    record: AdapterRecord
    entry: EntryReport
    manifest: Manifest
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class VerifiedRegistry:
    report: AuditReport
    document: RegistryDocument
    adapters: tuple[VerifiedAdapter, ...]


def audit_registry(
    source: str | Path,
    trusted_state: str | Path | None = None,
    *,
    config: AuditConfig | None = None,
) -> VerifiedRegistry:
    """Refresh ``trusted_state`` (a folder; None: a first use remembered nowhere) from the
    registry at ``source`` and verify everything; raises a RegistryError (RollbackError,
    FreezeError, ForkError for those attacks) naming what failed, the state unchanged."""
    from seqr.registry.client import refresh

    return refresh(source, trusted_state, config or AuditConfig(), mirror=None)


def pull_registry(
    url: str, folder: str | Path, *, config: AuditConfig | None = None
) -> VerifiedRegistry:
    """Fetch the registry at ``url`` into ``folder``: a verified mirror (metadata/, targets/,
    servable and auditable as it is) with the client's trusted state in ``folder/.seqr``.
    Only target files the mirror lacks are downloaded; nothing is written before it verifies."""
    from seqr.registry.client import MIRROR_STATE, refresh

    mirror = Path(folder)
    return refresh(url, mirror / MIRROR_STATE, config or AuditConfig(), mirror=mirror)


def trusted_state_for(source: str | Path, given: str | Path | None) -> str | Path | None:
    """The trusted state to use for ``source``: the one given, else a pulled mirror's own."""
    from seqr.registry.client import MIRROR_STATE

    if given is not None:
        return given
    state = Path(str(source)) / MIRROR_STATE
    return state if "://" not in str(source) and state.is_dir() else None
