"""Python source: the standard library of the running interpreter, one document per module.

Test suites, the IDLE tests, lib2to3's fixtures and installed third-party packages are left
out: they hold deliberately broken code, data-like fixtures and code that is not the stdlib.
Files that are not valid UTF-8 (a few encoding tests) are skipped, not guessed.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

from seqr.core.errors import DataError

from .text import Doc

__all__ = ["default_stdlib", "python_files", "python_docs", "EXCLUDED_DIRS"]

EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
)
MAX_FILE_BYTES = 1024 * 1024


def default_stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path) -> list[Path]:
    """``*.py`` under root outside the excluded folders, sorted by relative path."""
    if not root.is_dir():
        raise DataError(f"Python standard library folder {root} is missing; pass an existing one")
    files = [
        path
        for path in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
        and path.is_file()
        and not path.is_symlink()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def python_docs(root: Path) -> Iterator[Doc]:
    for path in python_files(root):
        data = path.read_bytes()
        if len(data) > MAX_FILE_BYTES:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        yield Doc(f"python:{path.relative_to(root).as_posix()}", text)
