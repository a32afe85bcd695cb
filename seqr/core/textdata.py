"""A client's private text folder -> fixed-length token chunks with a deterministic split.

Files are chosen by CONTENT, not by name: every regular file under the folder (recursively, in
sorted order, hidden files and folders skipped) whose bytes decode as strict UTF-8 and hold no
NUL byte is text, whatever it is called (GPL-3, COPYING, *.pm, *.changelog, a locale file
without extension). Binary or undecodable files are skipped, with one warning that gives their
count and a few names. Nothing unexpected is followed or opened: symbolic links (to files or
folders) are skipped, and FIFOs, sockets and devices are never opened (a FIFO would block the
reader forever); each file is opened with O_NOFOLLOW | O_NONBLOCK and checked to be a regular
file on the open descriptor. Reads are bounded (``TextLimits``: bytes per file, bytes in all,
files, depth). The texts are tokenized, joined with EOS between files and cut into chunks of
``seq_len`` tokens (the tail shorter than a chunk is dropped).

Split ("seqr/split/v1"): a chunk is held out when the first 8 bytes of
sha256(b"seqr/split/v1\\0" + seed as u64 LE + the chunk's token ids as i64 LE), read as a
big-endian integer / 2**64, is below ``heldout_fraction``. It depends only on the chunk's
content, so identical chunks always land on the same side and adding files never moves the
chunks already there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqr.core.errors import DataError
from seqr.core.printable import printable

__all__ = [
    "TextData",
    "TextFile",
    "TextLimits",
    "heldout_mask",
    "load_text_data",
    "read_text_file",
    "read_text_folder",
    "tokenize_chunks",
]

log = logging.getLogger("seqr.data")
SPLIT_FORMAT = "seqr/split/v1"
MAX_FILE_BYTES = 256 * 1024 * 1024  # bytes; a larger file is skipped (split it first)
_SHOWN = 5  # names listed in a warning


@dataclass(frozen=True)
class TextLimits:
    """What reading one data folder may cost."""

    max_file_bytes: int = MAX_FILE_BYTES  # bytes of one file; larger files are skipped
    max_total_bytes: int = 4 * 1024**3  # bytes of text in all files; more is a DataError
    max_files: int = 1_000_000  # directory entries visited; more is a DataError
    max_depth: int = 64  # nested folders below the data folder


@dataclass(frozen=True)
class TextFile:
    path: Path  # relative to the data folder
    text: str


@dataclass(frozen=True)
class TextData:
    """Tokenized chunks of one client's folder: (N, seq_len) int64 arrays."""

    train: np.ndarray
    heldout: np.ndarray
    files: int
    tokens: int  # tokens in all chunks (train + held-out)
    fingerprint: str  # sha256 over the train chunks: names the exact training data order

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def read_text_folder(folder: str | Path, limits: TextLimits | None = None) -> list[TextFile]:
    """Every UTF-8 text file under ``folder`` (see the module docstring); DataError when the
    folder is missing, over a limit or holds no text."""
    folder, limits = Path(folder), limits or TextLimits()
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist or is not a folder")
    files: list[TextFile] = []
    skipped: dict[str, list[str]] = {}
    total = 0
    for rel, path in _regular_files(folder, limits, skipped):
        raw = _read_regular(path, limits.max_file_bytes, rel, skipped)
        if raw is None:
            continue
        total += len(raw)
        if total > limits.max_total_bytes:
            raise DataError(
                f"data folder {folder} holds more than {limits.max_total_bytes} bytes of text; "
                "use a smaller folder"
            )
        text = _as_text(raw)
        if text is None:
            skipped.setdefault("binary or not UTF-8", []).append(rel)
        elif text.strip():
            files.append(TextFile(Path(rel), text))
    _warn_skipped(folder, skipped)
    if not files:
        seen = sum(len(v) for v in skipped.values())
        raise DataError(
            f"data folder {folder} holds no UTF-8 text file ({seen} file(s) skipped); "
            "text files are read whatever their name, binary ones are not"
        )
    return files


def read_text_file(path: str | Path, limits: TextLimits | None = None) -> TextFile:
    """One UTF-8 text file, read with the same care (no symlink, FIFO or device opened)."""
    path, limits = Path(path), limits or TextLimits()
    skipped: dict[str, list[str]] = {}
    raw = _read_regular(path, limits.max_file_bytes, path.name, skipped)
    text = None if raw is None else _as_text(raw)
    if text is None:
        why = next(iter(skipped), "binary or not UTF-8")
        raise DataError(f"cannot read {path} as text: {why}; give a UTF-8 text file")
    return TextFile(Path(path.name), text)


def _regular_files(
    folder: Path, limits: TextLimits, skipped: dict[str, list[str]]
) -> list[tuple[str, Path]]:
    """(relative name, path) of every regular, non-hidden file, sorted by path parts (the
    order rglob + sorted gave); never follows a link, never opens anything."""
    found: list[tuple[tuple[str, ...], str, Path]] = []
    stack: list[tuple[Path, tuple[str, ...]]] = [(folder, ())]
    visited = 0
    while stack:
        here, parts = stack.pop()
        try:
            with os.scandir(here) as listing:
                entries = list(listing)
        except OSError as exc:
            raise DataError(f"cannot list data folder {here}: {exc.strerror or exc}") from None
        visited += len(entries)
        if visited > limits.max_files:
            raise DataError(
                f"data folder {folder} holds more than {limits.max_files} entries; "
                "use a smaller folder"
            )
        for entry in entries:
            name = (*parts, entry.name)
            rel = "/".join(name)
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                skipped.setdefault("symbolic link (not followed)", []).append(rel)
            elif entry.is_dir(follow_symlinks=False):
                if len(name) > limits.max_depth:
                    raise DataError(f"{folder / rel} is nested deeper than {limits.max_depth}")
                stack.append((Path(entry.path), name))
            elif entry.is_file(follow_symlinks=False):
                found.append((name, rel, Path(entry.path)))
            else:
                skipped.setdefault("not a regular file (FIFO, socket, device)", []).append(rel)
    for names in skipped.values():
        names.sort()
    return [(rel, path) for _, rel, path in sorted(found)]


def _read_regular(path: Path, cap: int, rel: str, skipped: dict[str, list[str]]) -> bytes | None:
    """The bytes of a regular file of at most ``cap`` bytes, or None (recorded in skipped).
    O_NOFOLLOW refuses a link swapped in since the listing; O_NONBLOCK keeps a FIFO swapped in
    from blocking the open; fstat on the descriptor decides what was really opened."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        skipped.setdefault(f"unreadable ({exc.strerror or exc})", []).append(rel)
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            skipped.setdefault("not a regular file (FIFO, socket, device)", []).append(rel)
            return None
        if info.st_size > cap:
            skipped.setdefault(f"larger than {cap} bytes (split it)", []).append(rel)
            return None
        raw = handle.read(cap + 1)
    if len(raw) > cap:  # grew since fstat
        skipped.setdefault(f"larger than {cap} bytes (split it)", []).append(rel)
        return None
    return raw


def _as_text(raw: bytes) -> str | None:
    """Strict UTF-8 without NUL bytes (text by content), BOM removed; None for binary."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None


def _warn_skipped(folder: Path, skipped: dict[str, list[str]]) -> None:
    for why, names in skipped.items():
        shown = ", ".join(printable(n, 80) for n in names[:_SHOWN])
        more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
        log.warning("data folder %s: skipped %d file(s), %s: %s%s", printable(folder),
                    len(names), why, shown, more)  # fmt: skip


def tokenize_chunks(files: Sequence[TextFile], tokenizer: Any, seq_len: int) -> np.ndarray:
    """(N, seq_len) int64 chunks of the files' tokens, EOS after each file."""
    ids: list[int] = []
    for file_ids in file_token_ids(files, tokenizer):
        ids.extend(file_ids)
    return as_chunks(ids, seq_len)


def file_token_ids(files: Sequence[TextFile], tokenizer: Any) -> Iterator[list[int]]:
    """Each file's token ids followed by EOS, one file at a time, tokenized as it is reached:
    the chunks of the first k files are the first chunks of all of them."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; cannot separate files")
    for item in files:
        yield [*tokenizer(item.text, add_special_tokens=False, verbose=False)["input_ids"], eos]


def as_chunks(ids: Sequence[int], seq_len: int) -> np.ndarray:
    """(N, seq_len) int64: the ids cut into whole chunks (a shorter tail is dropped)."""
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(
            f"the data has {len(ids)} tokens, fewer than one chunk of {seq_len}; add more text"
        )
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def heldout_mask(chunks: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out chunks (see SPLIT_FORMAT in the module docstring)."""
    prefix = SPLIT_FORMAT.encode() + b"\0" + struct.pack("<Q", seed)
    mask = np.zeros(len(chunks), dtype=bool)
    for i, chunk in enumerate(chunks):
        digest = hashlib.sha256(prefix + chunk.astype("<i8").tobytes()).digest()
        mask[i] = int.from_bytes(digest[:8], "big") / 2.0**64 < fraction
    return mask


def load_text_data(
    folder: str | Path,
    tokenizer: Any,
    *,
    seq_len: int,
    heldout_fraction: float,
    seed: int,
    files: Sequence[TextFile] | None = None,
) -> TextData:
    """Read, tokenize and split a folder (``files`` may be passed if already read)."""
    files = read_text_folder(folder) if files is None else files
    chunks = tokenize_chunks(files, tokenizer, seq_len)
    mask = heldout_mask(chunks, heldout_fraction, seed)
    train, heldout = chunks[~mask], chunks[mask]
    if len(train) == 0:
        raise DataError(
            f"all {len(chunks)} chunks of {folder} were held out; add more text or lower "
            "train-heldout-fraction"
        )
    fingerprint = hashlib.sha256(train.astype("<i8").tobytes()).hexdigest()
    return TextData(train, heldout, len(files), int(chunks.size), fingerprint)
