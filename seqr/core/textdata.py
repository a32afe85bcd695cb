"""A client's private text folder -> fixed-length token chunks with a deterministic split.

Files are read recursively in sorted order (hidden files and folders skipped), decoded as
strict UTF-8 (a bad file is named, never silently skipped), tokenized, joined with EOS between
files and cut into chunks of ``seq_len`` tokens (the tail shorter than a chunk is dropped).

Split ("seqr/split/v1"): a chunk is held out when the first 8 bytes of
sha256(b"seqr/split/v1\\0" + seed as u64 LE + the chunk's token ids as i64 LE), read as a
big-endian integer / 2**64, is below ``heldout_fraction``. It depends only on the chunk's
content, so identical chunks always land on the same side and adding files never moves the
chunks already there.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqr.core.errors import DataError

SPLIT_FORMAT = "seqr/split/v1"
TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tsv", ".tex", ".html", ".xml",
     ".yaml", ".yml", ".toml", ".ini", ".cfg", ".c", ".h", ".cpp", ".js", ".ts", ".java",
     ".go", ".rs", ".sh"}
)  # fmt: skip
MAX_FILE_BYTES = 256 * 1024 * 1024  # bytes; larger files are refused, split them first


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


def read_text_folder(
    folder: str | Path, suffixes: frozenset[str] = TEXT_SUFFIXES
) -> list[TextFile]:
    """Every text file under ``folder``, decoded as strict UTF-8; DataError names a bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist or is not a folder")
    try:
        paths = sorted(
            p
            for p in folder.rglob("*")
            if p.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            and p.is_file()
        )
    except OSError as exc:
        raise DataError(f"cannot list data folder {folder}: {exc}") from None
    if not paths:
        raise DataError(
            f"data folder {folder} holds no text files (looked for {', '.join(sorted(suffixes))})"
        )
    files = []
    for path in paths:
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise DataError(f"{path} is larger than {MAX_FILE_BYTES} bytes; split it")
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")  # strict
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                "convert it to UTF-8 or remove it from the data folder"
            ) from None
        text = text.removeprefix("\ufeff")
        if text.strip():
            files.append(TextFile(path.relative_to(folder), text))
    if not files:
        raise DataError(f"every text file in {folder} is empty")
    return files


def tokenize_chunks(files: Sequence[TextFile], tokenizer: Any, seq_len: int) -> np.ndarray:
    """(N, seq_len) int64 chunks of the files' tokens, EOS after each file."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; cannot separate files")
    ids: list[int] = []
    for item in files:
        ids.extend(tokenizer(item.text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(int(eos))
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
