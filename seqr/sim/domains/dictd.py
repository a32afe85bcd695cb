"""dictd databases (FOLDOC, GCIDE): a ``.index`` of base64 offsets into a gzipped ``.dict.dz``.

Format (dictd(8), "DATABASE FORMAT"; dictfmt(1)): each index line is
``headword TAB offset TAB length`` where offset and length are byte positions in the
uncompressed ``.dict`` written as numbers in base 64 over the alphabet
``A-Z a-z 0-9 + /`` (most significant digit first, no padding). The ``.dict.dz`` is a
dictzip file: plain gzip with a random-access table in the header's extra field, so the
gzip module reads it whole. Several headwords may point at the same definition.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from seqr.core.errors import DataError, FormatError

from .text import Doc, decode_text

__all__ = [
    "B64_ALPHABET",
    "IndexEntry",
    "decode_number",
    "encode_number",
    "parse_index",
    "read_entries",
    "foldoc_docs",
    "clean_foldoc",
]

B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DIGIT = {c: i for i, c in enumerate(B64_ALPHABET)}
MAX_DICT_BYTES = 256 * 1024 * 1024  # uncompressed GCIDE is ~40 MB; refuse gzip bombs
# dictfmt's own header entries ("00-database-info", "00databaseurl", ...).
_META = re.compile(r"^00-?database", re.IGNORECASE)


@dataclass(frozen=True)
class IndexEntry:
    headword: str
    offset: int
    length: int


def decode_number(digits: str) -> int:
    """A dictd base-64 number ("Gl8J" -> 6920969)."""
    if not digits:
        raise FormatError("empty dictd offset/length field")
    value = 0
    for ch in digits:
        if ch not in _DIGIT:
            raise FormatError(f"dictd number {digits!r} has {ch!r}, not in the base64 alphabet")
        value = value * 64 + _DIGIT[ch]
    return value


def encode_number(value: int) -> str:
    """Inverse of :func:`decode_number` (used to write test databases)."""
    if value < 0:
        raise ValueError(f"dictd numbers are non-negative, got {value}")
    digits = B64_ALPHABET[value % 64]
    while value >= 64:
        value //= 64
        digits = B64_ALPHABET[value % 64] + digits
    return digits


def parse_index(text: str) -> list[IndexEntry]:
    """Parse an index file's text; FormatError names the first bad line."""
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise FormatError(f"dictd index line {lineno} has {len(fields)} fields, needs 3")
        try:
            entries.append(
                IndexEntry(fields[0], decode_number(fields[1]), decode_number(fields[2]))
            )
        except FormatError as exc:
            raise FormatError(f"dictd index line {lineno}: {exc}") from None
    return entries


def read_entries(index_path: Path, dict_path: Path, package: str) -> Iterator[tuple[str, str]]:
    """(headword, definition text) once per distinct definition, in index order."""
    for path in (index_path, dict_path):
        if not path.is_file():
            raise DataError(
                f"dictd file {path} is missing: `apt-get install {package}` (or drop --no-install)"
            )
    index = parse_index(index_path.read_bytes().decode("utf-8", errors="replace"))
    data = _read_dict(dict_path)
    seen: set[tuple[int, int]] = set()
    for entry in index:
        key = (entry.offset, entry.length)
        if key in seen or _META.match(entry.headword):
            continue
        seen.add(key)
        if entry.offset + entry.length > len(data):
            raise FormatError(
                f"{index_path}: entry {entry.headword!r} ends at byte "
                f"{entry.offset + entry.length}, past the end of {dict_path} ({len(data)} bytes)"
            )
        yield entry.headword, decode_text(data[entry.offset : entry.offset + entry.length])


def _read_dict(path: Path) -> bytes:
    if path.suffix != ".dz":
        return path.read_bytes()
    with gzip.open(path, "rb") as fh:
        data = fh.read(MAX_DICT_BYTES + 1)
    if len(data) > MAX_DICT_BYTES:
        raise FormatError(f"{path} inflates past {MAX_DICT_BYTES} bytes; refusing it")
    return data


_BRACES = re.compile(r"\{([^{}]*)\}")


def clean_foldoc(entry: str) -> str:
    """FOLDOC markup to plain text: ``{cross reference}`` loses its braces."""
    return _BRACES.sub(r"\1", entry)


def foldoc_docs(dictd_dir: Path) -> Iterator[Doc]:
    """Every FOLDOC definition (headword line, subject tags like <programming>, body, date)."""
    index, data = dictd_dir / "foldoc.index", dictd_dir / "foldoc.dict.dz"
    for headword, text in read_entries(index, data, "dict-foldoc"):
        yield Doc(f"foldoc:{headword}", clean_foldoc(text))
