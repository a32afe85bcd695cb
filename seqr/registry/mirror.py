"""Writing what a verified refresh fetched into a pulled mirror (``seqr registry pull``).

A mirror is itself a consistent TUF repository that every consumer can read: new target
files first, then the metadata, and ``timestamp.json`` last, since a client reads the
timestamp first (TUF spec 5.4) and so never sees metadata whose files are not there yet.
Only called after every check of the refresh passed (client.py, step 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from seqr.registry import layout, store

__all__ = ["write_mirror"]


def write_mirror(
    mirror: Path,
    *,
    targets: Mapping[str, Path],
    roots: Sequence[bytes],
    metadata: Mapping[str, bytes],
    history: Mapping[str, Path],
    snapshot: tuple[str, bytes],
    timestamp: bytes,
) -> None:
    """New targets first, then metadata, timestamp.json last (the mirror's commit point).

    ``targets``: stored target name -> downloaded file; ``roots``: every root from version 1;
    ``metadata``: new versioned metadata files; ``history``: older targets versions fetched
    for the log (name -> downloaded file); ``snapshot``: its versioned name and bytes.
    """
    for stored, path in targets.items():
        store.write_new_file(mirror / layout.TARGETS / stored, path.read_bytes())
    folder = mirror / layout.METADATA
    for i, data in enumerate(roots, start=1):
        store.write_new_file(folder / layout.root_name(i), data)
    for name, data in metadata.items():
        store.write_new_file(folder / name, data)
    for name, path in history.items():
        store.write_new_file(folder / name, path.read_bytes())
    store.write_new_file(folder / snapshot[0], snapshot[1])
    store.write_file(folder / "timestamp.json", timestamp)
