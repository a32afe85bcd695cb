"""Licence texts: Debian's ``/usr/share/common-licenses`` and the packages' copyright files.

common-licenses holds the full texts (GPL, LGPL, Apache, MPL, GFDL, ...; the unversioned
names are symlinks, skipped). ``/usr/share/doc/<package>/copyright`` (DEP-5 or free form)
adds licence grants and notices; paragraphs are deduplicated across all files, since most
packages repeat the same boilerplate, so each paragraph appears once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from seqr.core.errors import DataError

from .text import Doc, decode_text, split_blocks

__all__ = ["license_docs", "MIN_PARAGRAPH_CHARS"]

MIN_PARAGRAPH_CHARS = 80  # shorter ones are mostly "Files: *" / "License: GPL-2+" stubs
MAX_FILE_BYTES = 1024 * 1024
BLOCK_BYTES = 8192
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*(?:\.[ \t]*)?\n")  # DEP-5 writes blank lines as " ."


# DEP-5 (copyright-format/1.0) header and Files stanzas: path globs and holder lists, not
# legal prose; the License stanzas and free-form notices are what we keep.
_DEP5_NOT_PROSE = re.compile(r"^(Format|Files|Upstream-Name|Upstream-Contact|Source):", re.I)


def _paragraphs(text: str) -> list[str]:
    paragraphs = (p.strip("\n") for p in _PARAGRAPH_BREAK.split(text))
    return [p for p in paragraphs if p.strip() and not _DEP5_NOT_PROSE.match(p)]


def _key(paragraph: str) -> bytes:
    return hashlib.sha256(" ".join(paragraph.split()).lower().encode()).digest()


def license_docs(licenses_dir: Path, doc_dir: Path | None) -> Iterator[Doc]:
    """Full licence texts first, then each package's not-yet-seen copyright paragraphs."""
    if not licenses_dir.is_dir():
        raise DataError(f"licence folder {licenses_dir} is missing (Debian base-files ships it)")
    seen: set[bytes] = set()
    texts = sorted(p for p in licenses_dir.iterdir() if p.is_file() and not p.is_symlink())
    copyrights: list[Path] = []
    if doc_dir is not None and doc_dir.is_dir():
        copyrights = sorted(
            p / "copyright"
            for p in doc_dir.iterdir()
            if p.is_dir() and not p.is_symlink() and (p / "copyright").is_file()
        )
    for path in texts + copyrights:
        data = path.read_bytes()[:MAX_FILE_BYTES]
        fresh = []
        for paragraph in _paragraphs(decode_text(data)):
            key = _key(paragraph)
            if len(paragraph) < MIN_PARAGRAPH_CHARS or key in seen:
                continue
            seen.add(key)
            fresh.append(paragraph)
        label = path.name if path.parent == licenses_dir else path.parent.name
        # A few packages carry hundreds of KB of notices; blocks keep them from crowding
        # out everything else when the domain is sampled.
        for block in split_blocks("\n\n".join(fresh), BLOCK_BYTES) if fresh else []:
            yield Doc(f"licences:{label}", block)
