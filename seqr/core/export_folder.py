"""Reading a client's export folder into memory: bounded, regular files only.

Verification works on ``{name: bytes}`` (manifest.verify_export_files, admission.admit); this
is the one place that touches the folder, and it refuses anything that could make the bytes
verified differ from the bytes later used: symlinks (the target can change), subfolders,
hidden files, and more bytes than the budget (never read past it).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from seqr.core.errors import FormatError

__all__ = ["MAX_EXPORT_FILES", "DEFAULT_MAX_EXPORT_BYTES", "check_file_name", "read_export"]

MAX_EXPORT_FILES = 16  # files in one export folder, manifest and signature included
DEFAULT_MAX_EXPORT_BYTES = 1024**3  # bytes (1 GiB) over all files of one export
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_file_name(name: object, *, where: str = "export") -> None:
    if not isinstance(name, str) or not _FILE_NAME.match(name):
        raise FormatError(
            f"file name {name!r:.80} in {where} is not allowed: use 1-128 characters of "
            "A-Z a-z 0-9 . _ - not starting with a dot (no paths, no hidden files)"
        )


def read_export(
    folder: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_EXPORT_BYTES,
    max_files: int = MAX_EXPORT_FILES,
) -> dict[str, bytes]:
    """Read an export folder into ``{name: bytes}`` with bounded reads.

    Refuses (FormatError) symlinks, subfolders and other non-regular entries, odd names
    (hidden files, leftovers of interrupted writes), more than ``max_files`` files and more
    than ``max_total_bytes`` bytes in all; never reads past the budget.
    """
    folder = Path(folder)
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except FileNotFoundError:
        raise FormatError(f"export folder {folder} does not exist") from None
    except NotADirectoryError:
        raise FormatError(f"export path {folder} is not a folder") from None
    if len(entries) > max_files:
        raise FormatError(
            f"export folder {folder} has {len(entries)} entries, over the limit of {max_files}"
        )
    files: dict[str, bytes] = {}
    budget = max_total_bytes
    for entry in entries:
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise FormatError(
                f"{entry.path} is not a regular file (symlink or folder); an export holds "
                "only regular files"
            )
        check_file_name(entry.name, where=str(folder))
        data = _read_bounded(Path(entry.path), budget, max_total_bytes)
        budget -= len(data)
        files[entry.name] = data
    return files


def _read_bounded(path: Path, budget: int, max_total_bytes: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise FormatError(f"cannot open {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise FormatError(f"{path} is not a regular file")
        data = handle.read(budget + 1)
    if len(data) > budget:
        raise FormatError(
            f"export is over the limit of {max_total_bytes} bytes (at {path.name}); "
            "is this an adapter export?"
        )
    return data
