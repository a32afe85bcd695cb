"""A client's trusted state: what it verified last, changed only by a refresh that passed.

The state folder holds ``current`` (the name of the committed state folder), that folder
(python-tuf's metadata cache ``tuf/`` and the transparency log's leaves ``log.json``) and a
lock. A refresh takes the lock (two audits at once would otherwise race: a stale mirror's
audit finishing last could put an older version back, so the next refresh would accept a
fork), works on a copy, and commits by atomically replacing ``current``; on any failure the
copy is deleted and the state is exactly what it was (python-tuf: a rejected update never
changes what is trusted; tough once cached a timestamp that failed its rollback check).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from seqr.core.atomic_write import write_atomic
from seqr.core.errors import ConfigError, FormatError
from seqr.registry import store

__all__ = ["TrustStore", "TrustSession"]

_CURRENT = "current"
_LOCK = "lock"
_NAME = re.compile(r"state-[0-9a-f]{16}")


@dataclass
class TrustSession:
    """A working copy of the trusted state, committed only on success."""

    store: TrustStore
    work: Path
    previous: Path | None
    committed: bool = False

    @property
    def first_use(self) -> bool:
        return self.previous is None

    def commit(self) -> None:
        write_atomic(self.store.path / _CURRENT, (self.work.name + "\n").encode())
        self.committed = True
        if self.previous is not None:
            shutil.rmtree(self.previous, ignore_errors=True)


class TrustStore:
    """The state folder of one registry client (created 0700 on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise ConfigError(
                f"trusted state {self.path} is not a folder; give a folder for seqr to keep "
                "the registry's trusted state in (created if missing)"
            )
        store.ensure_dir(self.path)
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o700)

    def current(self) -> Path | None:
        data = store.read_optional(self.path, _CURRENT, 64, "trusted state pointer")
        if data is None:
            return None
        name = data.decode("ascii", "replace").strip()
        if not _NAME.fullmatch(name) or not (self.path / name).is_dir():
            raise FormatError(
                f"trusted state {self.path} is damaged ({_CURRENT} names {name!r:.40}); "
                "delete the folder to start over with a first use"
            )
        return self.path / name

    @contextlib.contextmanager
    def session(self) -> Iterator[TrustSession]:
        """Exclusive access (blocks while another refresh runs) to a copy of the state."""
        fd = os.open(
            self.path / _LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_abandoned()
            previous = self.current()  # read under the lock: the newest committed state
            work = self.path / f"state-{os.urandom(8).hex()}"
            if previous is None:
                work.mkdir(mode=0o700)
            else:
                shutil.copytree(previous, work, symlinks=True)
            session = TrustSession(self, work, previous)
            try:
                yield session
            finally:
                if not session.committed:
                    shutil.rmtree(work, ignore_errors=True)
        finally:
            os.close(fd)  # releases the flock

    def _remove_abandoned(self) -> None:
        """State folders of refreshes that died before committing (held under the lock)."""
        current = self.current()
        for entry in os.scandir(self.path):
            if _NAME.fullmatch(entry.name) and (current is None or entry.name != current.name):
                shutil.rmtree(entry.path, ignore_errors=True)
