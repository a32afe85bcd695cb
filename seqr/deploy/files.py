"""Writing deployment secrets: new files only, created with their final mode, never replaced.

A TLS or node private key that is silently overwritten orphans every party that trusted the
old one, so every writer here refuses existing files (KeyFileError naming the path) before it
creates anything, and creates private files 0600 from the first byte (seqr.core.atomic_write).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from seqr.core.atomic_write import create_new_file
from seqr.core.errors import KeyFileError

__all__ = ["write_new_files"]

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def write_new_files(out_dir: Path, files: Mapping[str, tuple[bytes, int]]) -> list[Path]:
    """Create every ``name -> (bytes, mode)`` in ``out_dir`` (0700 if new), or none of them."""
    out_dir = Path(out_dir)
    taken = [out_dir / n for n in files if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    if taken:
        raise KeyFileError(
            f"{', '.join(map(str, taken))} already exist(s); refusing to overwrite keys or "
            "certificates. Move them away first or choose another --out directory"
        )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for name, (data, mode) in files.items():
            path = out_dir / name
            try:
                create_new_file(path, data, mode=mode)
            except FileExistsError:
                raise KeyFileError(f"{path} appeared meanwhile; not replaced") from None
            written.append(path)
    except BaseException:
        for path in written:  # all or nothing: a CA key without its certificate is useless
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return written
