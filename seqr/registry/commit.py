"""The publisher's commit step and its lock.

A registry version becomes visible only when its timestamp is written (TUF's snapshot and
timestamp roles, python-tuf Metadata API): ``write_commit`` writes the snapshot when it must
and then the timestamp, the single commit point, so a crash before it leaves the previous
version in place and a crash after it leaves the new one (tests/test_registry_crash.py).
``lock_registry`` lets one publisher at a time write a registry folder.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api.metadata import Root, Snapshot, Targets, Timestamp

from seqr.core.errors import RegistryError
from seqr.registry import layout, log, repository, roles
from seqr.registry.config import PublisherConfig

__all__ = ["lock_registry", "write_commit"]


def write_commit(
    path: Path,
    root: Root,
    signers: Sequence[Any],
    config: PublisherConfig,
    when: datetime,
    targets_data: bytes | None,
    leaves: list[bytes],
    before: repository.Committed | None,
) -> None:
    """Write the snapshot (when targets changed or it would expire before the new timestamp)
    and then the timestamp, the commit point. ``targets_data``: a targets version already
    written but not yet committed; ``leaves``: the log's leaves before it."""
    version = 1 if before is None else before.snapshot.signed.version + 1
    name = layout.versioned_name("snapshot", version)
    snapshot_data = None if before is None else repository.read_metadata(path, name)
    if targets_data is not None:
        targets = roles.parse(targets_data, Targets, "targets").signed
        meta = roles.meta_file(targets.version, targets_data)
        head = log.TreeHead.of([*leaves, log.leaf_of(targets_data)], when)
    elif before is not None:
        meta, head = before.snapshot.signed.meta["targets.json"], before.head
    else:
        raise RegistryError("a new registry needs its first targets version")
    if snapshot_data is not None:  # written before a crash: complete it, never re-sign it
        snapshot = roles.parse(snapshot_data, Snapshot, name)
        roles.check_signed(root, Snapshot.type, snapshot, name)
        if snapshot.signed.meta["targets.json"].version != meta.version:
            raise RegistryError(f"{name} was written for another targets version")
    elif (
        before is None
        or targets_data is not None
        or (before.snapshot.signed.expires < when + config.timestamp_expires)
    ):
        snapshot_data = repository.write_role(path, root, signers, Snapshot(
            version=version,
            expires=when + config.snapshot_expires,
            meta={"targets.json": meta},
            unrecognized_fields={layout.LOG_FIELD: head.to_field()},
        ))  # fmt: skip
    else:
        version -= 1
        snapshot_data = repository.read_metadata(path, layout.versioned_name("snapshot", version))
        if snapshot_data is None:
            raise RegistryError(f"snapshot version {version} is missing")
    timestamp = Timestamp(
        version=1 if before is None else before.timestamp.signed.version + 1,
        expires=when + config.timestamp_expires,
        snapshot_meta=roles.meta_file(version, snapshot_data),
    )
    repository.write_role(path, root, signers, timestamp)


def lock_registry(path: Path) -> int:
    """An exclusive flock on the registry folder itself (the folder must exist)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise RegistryError(
            f"{path} is not a registry folder ({exc.strerror}); create one with `seqr server init`"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RegistryError(f"another publisher is writing {path}; one at a time") from None
    return fd
