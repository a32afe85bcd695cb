"""fortune(6) files: plain text, one entry per block, blocks separated by a line ``%``.

Layout (Debian fortunes, fortunes-de/-es/-it): one folder per language (English at the top,
``de/``, ``es/``, ``it/`` below), each file a category; ``*.dat`` are strfile(1) indexes,
``*.u8`` are UTF-8 twins (symlinks in current packages), and ``off/`` holds the offensive
sets, which we never read. The English top folder also links Italian files (``adams ->
it/adams``), so symlinks are skipped and a language's text comes only from its own folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from seqr.core.errors import DataError

from .text import Doc, decode_text

__all__ = ["parse_fortunes", "fortune_files", "fortune_docs", "SKIPPED_NAMES"]

# Pictures, not language: ASCII art categories in the English and German sets.
SKIPPED_NAMES = frozenset({"ascii-art", "asciiart", "banner"})
_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file into its entries (the ``%`` lines themselves are dropped)."""
    return [entry.strip("\n") for entry in _SEPARATOR.split(text) if entry.strip()]


def fortune_files(folder: Path) -> list[Path]:
    """Category files directly in ``folder``: regular files only, sorted by name.

    Not recursive, so ``off/`` and the other languages' folders are never read.
    """
    if not folder.is_dir():
        raise DataError(
            f"fortunes folder {folder} is missing: apt-get install the fortunes package"
        )
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.is_symlink()
        and path.suffix not in (".dat", ".u8")
        and path.name not in SKIPPED_NAMES
        and path.parent.name != "off"
    )


def fortune_docs(folder: Path) -> Iterator[Doc]:
    """Every entry of every category file in one language folder."""
    for path in fortune_files(folder):
        for entry in parse_fortunes(decode_text(path.read_bytes())):
            yield Doc(f"fortunes:{path.parent.name}/{path.name}", entry)
