"""GCIDE split by subject: Webster's 1913 marks senses with field labels like ``(Zool.)``.

An entry joins a subject when at least ``MAJORITY`` of its field labels belong to that
subject, so mixed entries ("Barnacle": (Far.) and (Zool.)) stay out of every subject.
Bytes per subject in dict-gcide 0.48.5 with this rule: zoology 2.5 MB, botany 1.4 MB,
medicine (Med/Anat/Physiol/Surg) 1.3 MB, chemistry 0.9 MB, nautical 0.8 MB; music (0.3 MB)
and the rest are too small for a 400 KB domain.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .dictd import read_entries
from .text import Doc

__all__ = ["SUBJECTS", "subject_of", "clean_gcide", "gcide_docs"]

SUBJECTS: dict[str, tuple[str, ...]] = {
    "zoology": ("Zool",),
    "botany": ("Bot",),
    "chemistry": ("Chem",),
    "nautical": ("Naut",),
    "medicine": ("Med", "Anat", "Physiol", "Surg"),
}
MAJORITY = 0.6
_LABEL = re.compile(r"\(([A-Z][a-z]+)\.\)")
_LABEL_TO_SUBJECT = {label: subject for subject, labels in SUBJECTS.items() for label in labels}
# Source notes on a line of their own: "[1913 Webster]", "[PJC]", "[WordNet 1.5]".
_SOURCE_NOTE = re.compile(r"^\s*\[[^\]\n]*\]\s*$", re.MULTILINE)
_BRACES = re.compile(r"\{([^{}]*)\}")


def subject_of(entry: str) -> str | None:
    """The subject most of the entry's field labels name, or None (untagged or mixed)."""
    labels = _LABEL.findall(entry)
    if not labels:
        return None
    counts = Counter(_LABEL_TO_SUBJECT.get(label) for label in labels)
    subject, count = counts.most_common(1)[0]
    if subject is None or count < MAJORITY * len(labels):
        return None
    return subject


def clean_gcide(entry: str) -> str:
    """Drop the per-sense source notes and the braces of cross references."""
    return _BRACES.sub(r"\1", _SOURCE_NOTE.sub("", entry))


@functools.lru_cache(maxsize=2)
def _classified(
    index_path: Path, dict_path: Path, _stamp: tuple[int, ...]
) -> tuple[tuple[str, str, str], ...]:
    # One pass over the 40 MB dictionary serves all five subject domains; _stamp (sizes and
    # mtimes) keeps the cache from serving a file that changed since.
    return tuple(
        (subject, headword, text)
        for headword, text in read_entries(index_path, dict_path, "dict-gcide")
        if (subject := subject_of(text)) is not None
    )


def gcide_docs(dictd_dir: Path, subject: str) -> Iterator[Doc]:
    if subject not in SUBJECTS:
        raise ValueError(f"unknown GCIDE subject {subject!r}; known: {sorted(SUBJECTS)}")
    index_path, dict_path = dictd_dir / "gcide.index", dictd_dir / "gcide.dict.dz"
    entries = _classified(index_path, dict_path, _stamp(index_path, dict_path))
    for entry_subject, headword, text in entries:
        if entry_subject == subject:
            yield Doc(f"gcide:{headword}", clean_gcide(text))


def _stamp(*paths: Path) -> tuple[int, ...]:
    stats = [p.stat() if p.exists() else None for p in paths]
    return tuple(v for st in stats for v in ((st.st_size, st.st_mtime_ns) if st else (-1, -1)))
