"""On-disk layout of a registry folder, and the only file I/O of the registry package.

A registry is a folder anyone can copy or serve as static files::

    latest.json                      {"version": N}: the newest COMPLETE version (written last)
    root/<r>.root.json               root metadata r (server keys + threshold), immutable
    metadata/<v>.registry.json       registry version v (DSSE envelope), immutable
    log/<v>.tree_head.json           RFC 9162 signed tree head of size v, immutable
    adapters/<sha256>/               one adapter, named by the SHA-256 of its weights:
        adapter_config.json  adapter_model.safetensors  norm_stats.json
        manifest.json  model.sig
    staging/                         publisher's durable queue (need not be served)

Consistent snapshots (TUF): every signed file carries its version in its name and is never
rewritten, so a reader that follows latest.json never mixes two versions, even while the
publisher writes the next one. Every write is atomic (temp file in the same folder, fsync,
rename, fsync of the folder: seqr.core.atomic_write); latest.json is replaced last, so a
crash at any point leaves the previous version complete and readable.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

from seqr.core.atomic_write import create_new_file, fsync_dir, write_atomic
from seqr.core.errors import FormatError

__all__ = [
    "POINTER",
    "STAGING",
    "root_path",
    "metadata_path",
    "tree_head_path",
    "adapter_path",
    "read_capped",
    "read_optional",
    "write_file",
    "write_new_file",
    "ensure_dir",
    "remove_stale_temp_files",
]

POINTER = "latest.json"
STAGING = "staging"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


def root_path(version: int) -> str:
    return f"root/{version}.root.json"


def metadata_path(version: int) -> str:
    return f"metadata/{version}.registry.json"


def tree_head_path(version: int) -> str:
    return f"log/{version}.tree_head.json"


def adapter_path(adapter_sha256: str, name: str) -> str:
    return f"adapters/{adapter_sha256}/{name}"


def read_optional(path: Path, cap: int, what: str) -> bytes | None:
    """Read at most ``cap`` bytes of a regular file; None if it does not exist.

    Never reads more than cap + 1 bytes (endless data, TUF): a longer file is a FormatError
    whatever its size. Symlinks and non-regular files are refused: a static registry has none,
    and following one could read outside the registry.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FormatError(f"cannot open {what} ({path}): {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{what} ({path}) is not a regular file")
        # Never allocate more than the file holds (+1 byte to notice growth or the cap).
        data = handle.read(min(cap, info.st_size) + 1)
    if len(data) > info.st_size and len(data) <= cap:
        raise FormatError(f"{what} ({path}) grew while it was read; read it again")
    if len(data) > cap:
        raise FormatError(
            f"{what} ({path}) is larger than its limit of {cap} bytes (endless data); "
            "refusing to read further"
        )
    return data


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """Like read_optional, but a missing file is a FormatError naming ``what``."""
    data = read_optional(path, cap, what)
    if data is None:
        raise FormatError(f"{what} is missing ({path}); is this a complete seqr registry?")
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
    """Atomically create or replace ``path`` (for latest.json, staging and adapter files)."""
    ensure_dir(Path(path).parent)
    write_atomic(Path(path), data)


def write_new_file(path: Path, data: bytes) -> None:
    """Atomically create ``path``; FileExistsError if it exists (signed files are immutable)."""
    ensure_dir(Path(path).parent)
    create_new_file(Path(path), data)


def remove_stale_temp_files(registry: Path) -> int:
    """Delete temp files left by writes a crash interrupted (seqr.core.atomic_write names them
    ``.<name>.<pid>.<8 hex>.tmp``). Only the publisher calls this, holding its lock."""
    removed = 0
    for path in Path(registry).rglob(".*.tmp"):
        if _TEMP_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed
