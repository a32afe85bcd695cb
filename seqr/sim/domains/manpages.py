"""Manual pages: roff source (man(7) macros, some mdoc(7) and tbl(1)) to plain text.

A small stripper, not a typesetter: it keeps every word a reader would see, drops layout
requests, fills running text into paragraphs (as nroff does outside ``.nf``) and keeps
no-fill blocks (synopses, examples) line by line. Escapes follow groff(7) "Escape sequences"
and groff_char(7) for the special characters; tables follow tbl(1) (format lines end in ".").
"""

from __future__ import annotations

import gzip
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

from seqr.core.errors import DataError

from .text import Doc, decode_text

__all__ = [
    "roff_to_text",
    "split_args",
    "man_page_files",
    "man_docs",
    "th_source",
    "SECTIONS",
    "PROJECT",
]

# Linux man-pages (Debian manpages, manpages-dev): 2 system calls, 3 library calls,
# 4 devices, 5 file formats, 7 overviews; "3type" etc. are man-pages' own subsections.
SECTIONS = ("2", "3", "4", "5", "7")
PROJECT = "Linux man-pages"  # the .TH source field of every page the project ships
_PAGE_NAME = re.compile(r"^[^.].*\.(?P<sec>[0-9])(?:const|type|head)?(?:\.gz)?$")
MAX_PAGE_BYTES = 4 * 1024 * 1024
WIDTH = 78

# groff_char(7) names that matter in man pages; unknown names vanish.
# fmt: off
_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "aq": "'", "dq": '"', "co": "\u00a9",
    "rg": "\u00ae", "tm": "\u2122", "de": "\u00b0", "mu": "\u00d7", "di": "\u00f7",
    "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "->": "\u2192",
    "<-": "\u2190", "rs": "\\", "ti": "~", "ha": "^", "ga": "`", "ul": "_", "sl": "/",
    "at": "@", "sh": "#", "Do": "$", "pl": "+", "eq": "=", "sc": "\u00a7", "ps": "\u00b6",
    "fm": "\u2032", "sd": "\u2033", "aa": "\u00b4", "lB": "[", "rB": "]", "lC": "{",
    "rC": "}", "la": "\u27e8", "ra": "\u27e9", "or": "|", "ba": "|", "ct": "\u00a2",
    "Po": "\u00a3", "Eu": "\u20ac", "Ye": "\u00a5", "12": "\u00bd", "14": "\u00bc",
    "ss": "\u00df", "'e": "\u00e9", "`e": "\u00e8", ":u": "\u00fc", ":o": "\u00f6",
    ":a": "\u00e4", "*a": "\u03b1", "*b": "\u03b2", "*m": "\u03bc", "*p": "\u03c0",
}
# Predefined strings of man(7)/mdoc(7) (\*(lq, \*R, \*(Tm).
# pod2man's preamble strings too (\*(C+, \*(L", \*(--), since Perl-made pages use them.
_STRINGS = {
    "lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "S": "", "C+": "C++",
    'L"': '"', 'R"': '"', "C`": "'", "C'": "'", "--": "\u2014", "PI": "\u03c0",
}
_SIMPLE = {
    "-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "'", "`": "`",
    ".": ".", "t": "\t",
}
# fmt: on

_ESCAPE = re.compile(
    r"""\\(?:
        (?P<comment>["\#].*)
      | f(?:\[[^\]]*\]|\(..|.)                      # font change
      | s(?:\[[^\]]*\]|\([+-]?\d\d|[+-]?\d+)         # size change
      | \((?P<char2>..)                              # special char, 2-letter name
      | \[(?P<charn>[^\]]*)\]                        # special char, long name
      | \*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))  # predefined string
      | [nkg](?:\(..|\[[^\]]*\]|.)                   # number register / mark
      | [hvwlLDoXZNbRx]'[^']*'                       # motions, widths, drawings
      | \$[0-9*@]                                    # macro arguments
      | (?P<simple>[-e\\ ~0'`.t])
      | [&|^%:c)/,{}aEpdruzy!?]?                     # zero-width and unhandled
    )""",
    re.VERBOSE,
)


def inline(text: str) -> str:
    """Resolve roff escapes in one line of text."""

    def repl(m: re.Match[str]) -> str:
        if m.group("comment") is not None:
            return "\x00"
        name = m.group("char2") or m.group("charn")
        if name is not None:
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _CHARS.get(name, "")
        string = m.group("str2") or m.group("strn") or m.group("str1")
        if string is not None:
            return _STRINGS.get(string, "")
        if m.group("simple") is not None:
            return _SIMPLE[m.group("simple")]
        return ""

    return _ESCAPE.sub(repl, text).split("\x00", 1)[0]


def split_args(text: str) -> list[str]:
    """Macro arguments: blanks separate, double quotes group, ``""`` inside quotes is a quote."""
    args: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            break
        if text[i] == '"':
            i += 1
            buf = []
            while i < n:
                if text[i] == '"':
                    if text[i + 1 : i + 2] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(text[i])
                i += 1
            args.append("".join(buf))
        else:
            start = i
            while i < n and text[i] not in " \t":
                i += 1
            args.append(text[start:i])
    return args


# Requests and macros that only change layout: they end a paragraph and print nothing.
# fmt: off
_BREAKS = frozenset({
    "PP", "P", "LP", "HP", "RS", "RE", "in", "ti", "sp", "ne", "bp", "PD", "Pp", "Lp", "Bl",
    "El", "Bd", "Ed", "Ss", "Sp",
})
# Requests (and mdoc prologue macros) whose arguments are not text.
_SILENT = frozenset({
    "ad", "na", "hy", "nh", "ft", "ps", "vs", "ll", "fam", "ss", "cs", "ta", "UC", "DT", "ns",
    "rs", "ce", "ie", "el", "if", "ds", "nr", "rm", "rn", "tr", "char", "ev", "mso", "do",
    "while", "hc", "lf", "pc", "hw", "cu", "ul", "eo", "ec", "ab", "tm", "lt", "pl", "mk",
    "fl", "cc", "c2", "so", "Dd", "Dt", "Os", "UR", "MT", "IX",
})
# fmt: on
_ALTERNATING = frozenset({"BR", "BI", "IB", "RB", "RI", "IR"})


class _Writer:
    """Collects output lines: filled paragraphs (wrapped) and no-fill lines verbatim."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.para: list[str] = []
        self.fill = True
        self.tag_next = False  # after .TP (and a bare .SH) the next text line stands alone

    def text(self, line: str) -> None:
        if self.fill:
            if line.strip():
                self.para.append(line.strip())
                if self.tag_next:
                    self.line_break()
                    self.tag_next = False
        else:
            self.lines.append(line)

    def line_break(self) -> None:
        if self.para:
            joined = " ".join(self.para)
            self.lines.extend(
                textwrap.wrap(joined, WIDTH, break_long_words=False, break_on_hyphens=False)
            )
            self.para = []

    def paragraph(self) -> None:
        self.line_break()
        self.lines.append("")


def _macro_words(name: str, args: list[str]) -> str | None:
    """The visible words of a font or inline macro; None for layout requests."""
    if name in _ALTERNATING:
        return "".join(args)
    if name == "OP":
        return f"[{' '.join(args)}]"
    if name in _BREAKS or name in _SILENT or (name.islower() and len(name) <= 3):
        return None
    # B, I, SM, SB, UE, ME, SY and mdoc's Nm, Fn, Ar, Fl, ...: their words are text.
    return " ".join(args) if args else None


def _table_line(raw: str, tab: str) -> str | None:
    """One tbl data line as text: cells joined by two spaces, T{ T} and rules dropped."""
    if raw.startswith((".", "'")):
        name, _, rest = raw[1:].strip().partition(" ")
        return _macro_words(name, [inline(a) for a in split_args(rest)])
    if raw.strip() in ("_", "=", ""):
        return None
    cells = [inline(c.replace("T{", "").replace("T}", "")).strip() for c in raw.split(tab)]
    return "  ".join(c for c in cells if c) or None


def roff_to_text(src: str) -> str:
    """Plain text of a man page; "" for a ``.so`` redirect (an alias of another page)."""
    out = _Writer()
    in_table = table_format = False
    tab = "\t"
    skipping_definition = False
    for raw in _logical_lines(src):
        if skipping_definition:
            skipping_definition = raw.strip() != ".."
            continue
        if in_table and not raw.startswith((".TE", ".T&")):
            if table_format:
                # tbl(1): an options line ends in ";", the format lines' last one in ".".
                if raw.rstrip().endswith(";"):
                    found = re.search(r"tab\s*\((.)\)", raw)
                    tab = found.group(1) if found else tab
                else:
                    table_format = not raw.rstrip().endswith(".")
            elif (row := _table_line(raw, tab)) is not None:
                out.lines.append(row)
            continue
        if not raw.startswith((".", "'")):
            if raw.startswith((" ", "\t")) and out.fill:
                out.line_break()
                out.lines.append(inline(raw).rstrip())
            else:
                out.text(inline(raw))
            continue
        name, _, rest = raw[1:].strip().partition(" ")
        if not name or name.startswith(('\\"', "\\#")):
            continue
        args = [inline(a) for a in split_args(rest)]
        if name == "so":
            return ""
        if name in ("de", "de1", "am", "ig"):
            skipping_definition = True
        elif name == "TH":
            out.lines.append(f"{args[0]}({args[1]})" if len(args) > 1 else " ".join(args))
            out.paragraph()
        elif name in ("SH", "Sh", "SS"):
            out.paragraph()
            if args:
                out.lines.append(" ".join(args))
                out.paragraph()
            else:
                out.tag_next = True
        elif name in ("nf", "EX", "Bd", "Vb"):
            out.paragraph()
            out.fill = False
        elif name in ("fi", "EE", "Ed", "Ve"):
            out.line_break()
            out.fill = True
            out.paragraph()
        elif name == "br":
            out.line_break()
        elif name in ("TP", "IP", "It", "TQ"):
            out.paragraph()
            out.tag_next = name in ("TP", "TQ")
            if name == "IP" and args:
                out.text(args[0])
            elif name == "It" and args:
                out.text(" ".join(args))
        elif name == "TS":
            out.paragraph()
            in_table, table_format, tab = True, True, "\t"
        elif name == "T&":
            table_format = True
        elif name == "TE":
            in_table = False
            out.paragraph()
        elif name in _BREAKS:
            out.paragraph()
        elif (words := _macro_words(name, args)) is not None:
            out.text(words)
    out.paragraph()
    return "\n".join(out.lines)


def _logical_lines(src: str) -> Iterator[str]:
    """Source lines with escaped newlines joined (a line ending in an unescaped ``\\``)."""
    pending = ""
    for line in src.split("\n"):
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending += line[:-1]
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def man_page_files(man_dir: Path, sections: tuple[str, ...] = SECTIONS) -> list[Path]:
    """Regular page files of the sections, sorted (symlinked aliases are skipped)."""
    if not man_dir.is_dir():
        raise DataError(f"man folder {man_dir} is missing: apt-get install manpages manpages-dev")
    files = []
    for section in sections:
        folder = man_dir / f"man{section}"
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _PAGE_NAME.match(path.name)
            if match and match["sec"] == section and path.is_file() and not path.is_symlink():
                files.append(path)
    return sorted(files, key=lambda p: (p.parent.name, p.name))


def read_page(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            data = fh.read(MAX_PAGE_BYTES + 1)
    else:
        data = path.read_bytes()[: MAX_PAGE_BYTES + 1]
    if len(data) > MAX_PAGE_BYTES:
        raise DataError(f"man page {path} is over {MAX_PAGE_BYTES} bytes; remove it or skip it")
    return decode_text(data)


def th_source(src: str) -> str:
    """The "source" argument of ``.TH title section date source manual`` (man(7)), or ""."""
    found = re.search(r"^\.TH[ \t]+(.*)$", src, re.MULTILINE)
    args = split_args(found.group(1)) if found else []
    return inline(args[3]) if len(args) > 3 else ""


def man_docs(man_dir: Path, project: str | None = PROJECT) -> Iterator[Doc]:
    """Pages of the Linux man-pages project (other packages' pages in the same sections,
    e.g. git's or systemd's, have other ``.TH`` sources); ``project=None`` keeps all."""
    for path in man_page_files(man_dir):
        src = read_page(path)
        if project is not None and not th_source(src).startswith(project):
            continue
        text = roff_to_text(src)
        if text.strip():
            yield Doc(f"man:{path.parent.name}/{path.name}", text)
