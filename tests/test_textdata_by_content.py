"""Data folders are read by content, not by file name: real licence texts, Debian docs, Perl
modules and changelogs without a known extension are text; binary files are skipped with a
count and names; symlinks, FIFOs and oversized trees are never followed, opened or read."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from tiny import tiny_model_dir
from transformers import AutoTokenizer

from seqr.core.errors import DataError
from seqr.core.textdata import TextLimits, load_text_data, read_text_file, read_text_folder


def _first(*patterns: str) -> Path:
    """The first existing system file matching one of the patterns (Debian paths)."""
    for pattern in patterns:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    raise AssertionError(f"none of {patterns} exists on this system (Debian base files)")


def _real_folder(root: Path) -> dict[str, str]:
    """A data folder of real files under their real (extension-less or unusual) names;
    returns relative name -> expected text."""
    data = root / "data"
    (data / "perl").mkdir(parents=True)
    (data / "doc").mkdir()
    copies = {
        "GPL-3": _first("/usr/share/common-licenses/GPL-3"),
        "COPYING": _first("/usr/share/common-licenses/GPL-2"),
        "LICENSE": _first("/usr/share/common-licenses/Apache-2.0"),
        "perl/Carp.pm": _first("/usr/lib/*/perl-base/Carp.pm", "/usr/share/perl/*/Carp.pm",
                               "/usr/share/perl/*/*.pm"),
        "doc/copyright": _first("/usr/share/doc/gzip/copyright"),
        "doc/TODO": _first("/usr/share/doc/gzip/TODO", "/usr/share/doc/*/TODO"),
        "C": _first("/usr/share/i18n/locales/C", "/usr/share/common-licenses/BSD"),
    }  # fmt: skip
    expected = {}
    for rel, source in copies.items():
        shutil.copyfile(source, data / rel)
        expected[rel] = source.read_text(encoding="utf-8").removeprefix("\ufeff")
    changelog = _first(
        "/usr/share/doc/gzip/changelog.Debian.gz", "/usr/share/doc/*/changelog.Debian.gz"
    )
    text = gzip.decompress(changelog.read_bytes()).decode("utf-8")
    (data / "gzip.changelog").write_text(text, encoding="utf-8")
    expected["gzip.changelog"] = text
    # Binary: the compressed changelog as shipped, and a PNG-like header with a NUL.
    shutil.copyfile(changelog, data / "doc" / "changelog.Debian.gz")
    (data / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return expected


def _read_with_deadline(folder: Path, seconds: float = 60.0) -> list:
    """read_text_folder in a thread: a reader that opened the FIFO would block forever."""
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(files=read_text_folder(folder)), daemon=True
    )
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "read_text_folder blocked (did it open the FIFO?)"
    return result["files"]  # type: ignore[return-value]


def test_real_file_names_are_read_by_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: real text under real names, binary files, a FIFO and symlinks.
    expected = _real_folder(tmp_path)
    data = tmp_path / "data"
    os.mkfifo(data / "pipe")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("never read\n")
    os.symlink(outside / "secret.txt", data / "linked.txt")
    os.symlink(outside, data / "linked-dir")
    # Execute
    with caplog.at_level(logging.WARNING, logger="seqr.data"):
        files = _read_with_deadline(data)
    # Assert: exactly the text files, with their exact contents, in sorted path order.
    assert {str(f.path): f.text for f in files} == expected
    assert [str(f.path) for f in files] == sorted(expected, key=lambda p: Path(p).parts)
    assert all("never read" not in f.text for f in files)
    log = caplog.text
    assert "skipped 2 file(s), binary or not UTF-8: doc/changelog.Debian.gz, logo.png" in log
    assert "skipped 2 file(s), symbolic link (not followed): linked-dir, linked.txt" in log
    assert "skipped 1 file(s), not a regular file (FIFO, socket, device): pipe" in log


def test_real_named_folder_trains_chunks(tmp_path: Path) -> None:
    _real_folder(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    data = load_text_data(tmp_path / "data", tokenizer, seq_len=64, heldout_fraction=0.1, seed=0)
    assert data.files == 8 and len(data.train) > 100


def test_folder_of_only_binary_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(bytes(range(256)))
    shutil.copyfile(_first("/usr/share/doc/gzip/changelog.Debian.gz"), tmp_path / "changelog")
    with pytest.raises(DataError, match="holds no UTF-8 text file \\(2 file\\(s\\) skipped\\)"):
        read_text_folder(tmp_path)


def test_reads_are_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "small").write_text("a" * 10)
    (tmp_path / "large").write_text("b" * 100)
    with caplog.at_level(logging.WARNING, logger="seqr.data"):
        files = read_text_folder(tmp_path, TextLimits(max_file_bytes=50))
    assert [str(f.path) for f in files] == ["small"]
    assert "larger than 50 bytes (split it): large" in caplog.text
    with pytest.raises(DataError, match="more than 64 bytes of text"):
        read_text_folder(tmp_path, TextLimits(max_total_bytes=64))
    with pytest.raises(DataError, match="more than 1 entries"):
        read_text_folder(tmp_path, TextLimits(max_files=1))
    deep = tmp_path / "d1" / "d2" / "d3"
    deep.mkdir(parents=True)
    (deep / "x").write_text("deep\n")
    with pytest.raises(DataError, match="nested deeper than 2"):
        read_text_folder(tmp_path, TextLimits(max_depth=2))


def test_single_file_reader_refuses_fifo_symlink_and_binary(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    os.symlink(_first("/usr/share/common-licenses/GPL-3"), tmp_path / "link")
    (tmp_path / "bin").write_bytes(b"\x00\x01")
    for name, why in (("pipe", "not a regular file"), ("link", "unreadable"), ("bin", "binary")):
        with pytest.raises(DataError, match=why):
            read_text_file(tmp_path / name)
    licence = _first("/usr/share/common-licenses/GPL-3")
    assert read_text_file(licence).text.startswith(licence.read_text()[:40])
