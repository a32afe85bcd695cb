"""Python's documentation sources (Debian python3.11-doc: ``html/_sources/**/*.rst.txt``).

reStructuredText stays recognisable prose: we drop only what a reader never sees as text
(comments and link targets, ``.. index::`` blocks, author lines) and reduce interpreted
roles and links to their visible words (Docutils spec "Interpreted Text", "Hyperlink
References"; Sphinx roles: ``~`` shows the last component, ``!`` suppresses the link).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from seqr.core.errors import DataError

from .text import Doc, decode_text

__all__ = ["rst_to_text", "rst_files", "rst_docs", "DEFAULT_PACKAGE"]

DEFAULT_PACKAGE = "python3.11-doc"
# Directives whose whole block is markup for the HTML build, not text.
_DROPPED_DIRECTIVES = frozenset(
    {
        "index",
        "moduleauthor",
        "sectionauthor",
        "highlight",
        "toctree",
        "raw",
        "only",
        "testsetup",
        "testcleanup",
        "include",
        "audit-event-table",
        "impl-detail-dummy",
    }
)
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::")
# Explicit markup that is not a directive, footnote or substitution: a comment or a target.
_COMMENT_OR_TARGET = re.compile(r"^\.\.(\s|$)(?!\s*[\[|])")
_ROLE = re.compile(r":(?P<role>[\w:+-]+):`(?P<inner>[^`]*)`")
_NUMBERED_ROLES = {"rfc": "RFC", "pep": "PEP"}
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")


def _role_text(match: re.Match[str]) -> str:
    inner = match.group("inner")
    if match.group("role") in _NUMBERED_ROLES:
        return f"{_NUMBERED_ROLES[match.group('role')]} {inner}"
    explicit = re.fullmatch(r"(.*?)\s*<[^<>]*>", inner, re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    inner = inner.lstrip("!")
    if inner.startswith("~"):
        return inner[1:].rsplit(".", 1)[-1]
    return inner


def rst_to_text(src: str) -> str:
    out: list[str] = []
    skip_indent: int | None = None  # inside a dropped block: skip lines indented past this
    for line in src.split("\n"):
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        directive = _DIRECTIVE.match(line.lstrip())
        if directive and directive.group(1) in _DROPPED_DIRECTIVES:
            skip_indent = indent
            continue
        if not directive and _COMMENT_OR_TARGET.match(line.lstrip()):
            skip_indent = indent  # a comment's indented continuation is comment too
            continue
        line = _ROLE.sub(_role_text, line)
        line = _LINK.sub(r"\1", line)
        out.append(_REF.sub(r"\1", line))
    return "\n".join(out)


def rst_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(
            f"Python docs folder {folder} is missing: apt-get install {DEFAULT_PACKAGE}"
        )
    return sorted(
        (p for p in folder.rglob("*.rst.txt") if p.is_file() and not p.is_symlink()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def rst_docs(folder: Path) -> Iterator[Doc]:
    for path in rst_files(folder):
        yield Doc(
            f"pydocs:{path.relative_to(folder).as_posix()}",
            rst_to_text(decode_text(path.read_bytes())),
        )
