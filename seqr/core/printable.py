"""Text from another party, made safe to print on a terminal or in a log line.

Adapter names, revocation reasons, error texts and generated text come from clients, servers
or mirrors. Printed raw, an ANSI escape sequence (ESC [ ... ) can recolour, move the cursor,
clear the screen or set the window title, a carriage return can overwrite what a line said
before it, a newline can forge a whole extra line ("admitted: ..."), and bidirectional
overrides (U+202E, "Trojan Source", CVE-2021-42574) can make text read differently from its
bytes. ``printable`` keeps every visible character (any language, emoji) and replaces each
control, format, surrogate, private-use or unassigned code point with its escape, as
Python's ``ascii`` writes it (``\\x1b``, ``\\u202e``), so nothing is hidden and nothing acts.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# Unicode general categories that do not print as themselves: controls (Cc: C0, DEL, C1),
# format characters (Cf: bidi overrides and isolates, zero-width joiners), surrogates (Cs),
# private use (Co), unassigned (Cn), and the line / paragraph separators (Zl, Zp).
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: object, max_chars: int | None = None) -> str:
    """``str(text)`` with every non-printing code point escaped; cut to ``max_chars``
    characters of the original (with "...") when given."""
    value = str(text)
    cut = max_chars is not None and len(value) > max_chars
    if cut:
        value = value[:max_chars]
    out = "".join(_escape(ch) if unicodedata.category(ch) in _HIDDEN else ch for ch in value)
    return out + "..." if cut else out


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
