"""Four text types from this machine's own files, for `seqr simulate --data OUT`.

Not among `seqr data prepare`'s domains on purpose: docs/RESULTS.md uses them as a domain set
nobody tuned routing for (C headers, Perl modules, Debian changelogs, shell scripts). What a
machine holds varies with its installed packages, so two machines give different text.

    python examples/machine_text_types.py runs/machine-text
    seqr simulate --data runs/machine-text --out runs/machine-text-sim
"""

from __future__ import annotations

import glob
import gzip
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

DOMAIN_BYTES = 1_000_000  # as `seqr data prepare`'s default cap
PART_BYTES = 131_072
FILE_CHARS = 20_000  # no one file dominates a domain
MAX_FILE_BYTES = 64 << 20  # read with a limit (a file larger than this is cut, then judged)
SHEBANGS = (b"#!/bin/sh", b"#! /bin/sh", b"#!/bin/bash", b"#!/usr/bin/env bash")


def shell_scripts(roots: tuple[str, ...]) -> Iterator[str]:
    """Regular files (not symlinks) under ``roots`` that start with a shell's #! line."""
    for root in roots:
        for folder, _, names in os.walk(root):  # os.walk does not follow symlinked folders
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    try:
                        with open(path, "rb") as f:
                            if f.read(40).startswith(SHEBANGS):
                                yield path
                    except OSError:
                        continue


def sources() -> dict[str, list[str]]:
    """Each domain's candidate files (this machine's own system files)."""
    perl = ("/usr/share/perl/**/*.pm", "/usr/share/perl5/**/*.pm")
    scripts = ("/usr/bin", "/usr/sbin", "/usr/share", "/etc", "/usr/lib/x86_64-linux-gnu",
               "/usr/libexec")  # fmt: skip
    return {
        "c_headers": glob.glob("/usr/include/**/*.h", recursive=True),
        "perl_modules": [p for pattern in perl for p in glob.glob(pattern, recursive=True)],
        "debian_changelogs": glob.glob("/usr/share/doc/*/changelog.Debian.gz"),
        "shell_scripts": list(set(shell_scripts(scripts))),  # write_domain sorts
    }


def read_text(path: str) -> str | None:
    """The file's first FILE_CHARS characters if the whole file is UTF-8 text, else None."""
    try:
        with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES)
        return data.decode("utf-8")[:FILE_CHARS]
    except (OSError, EOFError, UnicodeDecodeError):
        return None


def write_domain(folder: Path, files: list[str]) -> int:
    """Files in a fixed shuffled order, joined by a blank line, up to DOMAIN_BYTES, written
    as part files cut at character boundaries. Returns the number of files used."""
    order = sorted(files)
    random.Random(0).shuffle(order)
    texts, size = [], 0
    for path in order:
        text = read_text(path)
        if text is None or len(text) < 200:
            continue
        texts.append(text)
        size += len(text.encode())
        if size >= DOMAIN_BYTES:
            break
    data = "\n\n".join(texts).encode()[:DOMAIN_BYTES]
    folder.mkdir(parents=True)
    for k, start in enumerate(range(0, len(data), PART_BYTES)):
        part = data[start : start + PART_BYTES].decode("utf-8", "ignore")
        (folder / f"part-{k:03d}.txt").write_text(part, encoding="utf-8")
    return len(texts)


def main(out: Path) -> None:
    if out.exists():
        sys.exit(f"{out} exists; give a new folder")
    for name, files in sources().items():
        used = write_domain(out / name, files)
        print(f"{name}: {used} of {len(files)} files")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/machine_text_types.py OUT_FOLDER")
    main(Path(sys.argv[1]))
