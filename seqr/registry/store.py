"""The registry package's only file I/O: bounded reads that follow nothing, atomic writes.

Reads walk a relative path one component at a time from an open directory (openat with
O_NOFOLLOW), so no symlink anywhere in the path is followed, and open the file with O_NONBLOCK
so a FIFO planted in a registry can neither hang the reader nor be read; only regular files
are read, never more than their cap + 1 bytes (endless data, TUF). Writes are atomic (temp
file in the same folder, fsync, rename, fsync of the folder: seqr.core.atomic_write).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path

from seqr.core.atomic_write import create_new_file, fsync_dir, write_atomic
from seqr.core.errors import FormatError

__all__ = [
    "open_regular",
    "read_at_most",
    "read_capped",
    "read_optional",
    "write_file",
    "write_new_file",
    "ensure_dir",
    "remove_stale_temp_files",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")
_CHUNK = 1 << 20


def open_regular(base: Path, rel: str, what: str) -> int | None:
    """An fd for the regular file ``base/rel``, or None if it does not exist.

    ``rel`` is a relative path with "/" separators and no "." or ".." components; a symlink
    at any component, a FIFO, a device or a folder is refused with a FormatError naming
    ``what``. The caller closes the fd.
    """
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FormatError(f"{what}: {rel!r} is not a plain relative path")
    try:
        fd = os.open(base, os.O_RDONLY | _DIRECTORY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FormatError(f"cannot open {base} for {what}: {exc.strerror}") from None
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        flags = os.O_RDONLY | _NOFOLLOW | (os.O_NONBLOCK if last else _DIRECTORY)
        parent = fd
        try:
            fd = _open_in(parent, part, flags, what, rel)
        finally:
            os.close(parent)
        if fd < 0:
            return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{what} ({rel}) is not a regular file; refusing to read it")
    return fd


def read_optional(base: Path, rel: str, cap: int, what: str) -> bytes | None:
    """Read ``base/rel`` (a regular file of at most ``cap`` bytes, see open_regular); None
    if it does not exist. A longer file is refused before any of it is read."""
    fd = open_regular(base, rel, what)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise FormatError(
                f"{what} ({rel}) is {size} bytes, over its limit of {cap} bytes "
                "(endless data); refusing to read it"
            )
        data = read_at_most(fd, cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise FormatError(f"{what} ({rel}) grew past its limit of {cap} bytes while it was read")
    return data


def _open_in(dir_fd: int, name: str, flags: int, what: str, rel: str) -> int:
    """Open ``name`` inside ``dir_fd``; -1 if it does not exist."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FormatError(
                f"{what} ({rel}): {name!r} is a symlink or not a folder; a registry holds "
                "plain files and folders only"
            ) from None
        raise FormatError(f"cannot open {what} ({rel}): {exc.strerror}") from None


def read_at_most(fd: int, limit: int) -> bytes:
    chunks, total = [], 0
    while total < limit:
        chunk = os.read(fd, min(_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_capped(base: Path, rel: str, cap: int, what: str) -> bytes:
    """Like read_optional, but a missing file is a FormatError naming ``what``."""
    data = read_optional(base, rel, cap, what)
    if data is None:
        raise FormatError(f"{what} is missing ({rel} in {base})")
    return data


def ensure_dir(path: Path) -> None:
    """mkdir -p, fsyncing each new folder's parent so the folder itself survives a crash."""
    path = Path(path)
    if path.is_dir():
        return
    ensure_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    fsync_dir(path.parent)


def write_file(path: Path, data: bytes) -> None:
    """Atomically create or replace ``path``."""
    ensure_dir(Path(path).parent)
    write_atomic(Path(path), data)


def write_new_file(path: Path, data: bytes) -> None:
    """Atomically create ``path``; if it exists it must hold exactly ``data`` (a retried
    write after a crash or a full disk), else FileExistsError: signed files are immutable."""
    ensure_dir(Path(path).parent)
    try:
        create_new_file(Path(path), data)
    except FileExistsError:
        with open(path, "rb") as handle:
            if handle.read(len(data) + 1) != data:
                raise
    return None


def remove_stale_temp_files(folder: Path) -> int:
    """Delete temp files left by writes a crash interrupted (seqr.core.atomic_write names them
    ``.<name>.<pid>.<8 hex>.tmp``). Only a lock holder calls this."""
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):
        if _TEMP_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed
