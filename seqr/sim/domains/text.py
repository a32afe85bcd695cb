"""Plain-text helpers every domain reader shares: decoding, whitespace normalisation, blocks.

Readers yield :class:`Doc` objects with raw-ish text; the orchestrator normalises, dedupes,
samples and packs them, so every domain's files obey the same rules (UTF-8, NFC, no control
characters, no trailing spaces, at most one blank line in a row).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["Doc", "decode_text", "normalise", "split_blocks", "utf8_len"]

# C0 and C1 controls except tab and newline (tabs are expanded before this runs).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Teletype overstrike ("_\bx" underline, "x\bx" bold) as in nroff output and old fortunes.
_OVERSTRIKE = re.compile(r".\x08")
_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Doc:
    """One unit of text (a fortune, a dictionary entry, a source file, a scene block)."""

    source: str  # where it came from, for messages ("fortunes:de/zitate")
    text: str


def decode_text(data: bytes) -> str:
    """UTF-8 if valid, else Windows-1252 (old Gutenberg and GCIDE bytes), else Latin-1."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def normalise(text: str) -> str:
    """Canonical form: LF line ends, NFC, tabs expanded, no controls, single blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _OVERSTRIKE.sub("", text)
    text = unicodedata.normalize("NFC", text)
    lines = (_CONTROL.sub("", line.expandtabs(8)).rstrip() for line in text.split("\n"))
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n")


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def split_blocks(text: str, max_bytes: int) -> list[str]:
    """Cut text into blocks of at most ``max_bytes`` UTF-8 bytes at paragraph, then line breaks.

    Paragraphs stay whole when they fit; a longer paragraph is cut between lines, and a
    single line longer than the limit is cut between characters (never inside one).
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    # (piece, separator before it): paragraphs join with a blank line, cut lines with "\n".
    pieces: list[tuple[str, str]] = []
    for para in text.split("\n\n"):
        if utf8_len(para) <= max_bytes:
            pieces.append((para, "\n\n"))
            continue
        for i, line in enumerate(para.split("\n")):
            for j, cut in enumerate(_cut_line(line, max_bytes)):
                pieces.append((cut, "\n\n" if i == j == 0 else "\n"))
    blocks: list[str] = []
    current: list[str] = []
    size = 0
    for piece, sep in pieces:
        cost = utf8_len(piece)
        if current and size + len(sep) + cost > max_bytes:
            blocks.append("".join(current))
            current, size = [], 0
        if current:
            current.append(sep)
            size += len(sep)
        current.append(piece)
        size += cost
    if current:
        blocks.append("".join(current))
    return [b for b in blocks if b.strip()]


def _cut_line(line: str, max_bytes: int) -> list[str]:
    if utf8_len(line) <= max_bytes:
        return [line]
    out: list[str] = []
    start = 0
    while start < len(line):
        end = min(len(line), start + max_bytes)
        while utf8_len(line[start:end]) > max_bytes:
            end -= 1
        out.append(line[start:end])
        start = end
    return out
