"""From a reader's documents to a domain's files: normalise, dedupe, sample evenly, pack.

Sampling is spread over the whole source in its (sorted) order, so a 1 MB cap on a 12 MB
source keeps every ~12th byte's worth of documents from A to Z rather than the first 1 MB
(which would be, say, FOLDOC's "A" words only). Everything is deterministic: same sources,
same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .text import Doc, normalise, utf8_len

__all__ = [
    "DomainText",
    "select_spread",
    "pack_files",
    "cut_prefix",
    "build_domain_text",
    "SEPARATOR",
]

SEPARATOR = "\n\n"  # between documents inside a file
MAX_PASSES = 4  # later passes only top up the last few KB


@dataclass(frozen=True)
class DomainText:
    files: tuple[str, ...]  # contents of part-000.txt, part-001.txt, ...
    documents_read: int
    documents_kept: int
    bytes_available: int  # after normalising and dedup, before the cap


def select_spread(docs: Sequence[str], budget: int) -> list[str]:
    """Documents whose total stays within ``budget`` bytes, spread evenly over ``docs``.

    Error diffusion over bytes: each document adds ``size * budget / total`` of credit and is
    taken when the credit covers its size (and it still fits), so the kept share of every
    stretch of the source tracks budget / total. A pass can end short of the budget by up to
    one large document, so up to ``MAX_PASSES`` passes run over the documents not yet taken,
    with the budget left, and a first-fit pass tops up the rest. Source order is kept.
    """
    sizes = [utf8_len(d) + len(SEPARATOR) for d in docs]
    if sum(sizes) <= budget:
        return list(docs)
    chosen: set[int] = set()
    used = 0
    for _ in range(MAX_PASSES):
        rest = [i for i in range(len(docs)) if i not in chosen]
        rest_total = sum(sizes[i] for i in rest)
        if not rest or used >= budget:
            break
        fraction = min(1.0, (budget - used) / rest_total)
        credit, added = 0.0, 0
        for i in rest:
            credit += sizes[i] * fraction
            if credit >= sizes[i] and used + sizes[i] <= budget:
                credit -= sizes[i]
                chosen.add(i)
                used += sizes[i]
                added += 1
        if not added:
            break
    for i, size in enumerate(sizes):  # last few bytes: first fit, in source order
        if i not in chosen and used + size <= budget:
            chosen.add(i)
            used += size
    return [doc for i, doc in enumerate(docs) if i in chosen]


def pack_files(docs: Iterable[str], file_bytes: int) -> list[str]:
    """Pack documents in order into files of at most ``file_bytes`` bytes, each ending in "\\n".

    Files are filled up: a document that does not fit the room left is cut at its last
    paragraph break (else line break) inside that room and continues in the next file, so
    every file but the last is nearly ``file_bytes`` long.
    """
    limit = file_bytes - 1  # room for the final newline
    files: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        files.append(SEPARATOR.join(current) + "\n")
        current, size = [], 0

    for doc in docs:
        rest = doc
        while rest:
            room = limit - size - (len(SEPARATOR) if current else 0)
            if utf8_len(rest) <= room:
                current.append(rest)
                size += utf8_len(rest) + (len(SEPARATOR) if len(current) > 1 else 0)
                break
            head, tail = cut_prefix(rest, room, hard=not current)
            if not head or (current and utf8_len(head) < room // 2):
                flush()  # too little would fit: start the document in a fresh file
                continue
            current.append(head)
            flush()
            rest = tail
    if current:
        flush()
    return files


def cut_prefix(text: str, max_bytes: int, *, hard: bool) -> tuple[str, str]:
    """(head, rest): head is at most ``max_bytes`` UTF-8 bytes and ends before the last blank
    line (else newline) that fits; the break itself is dropped. With ``hard`` and no break,
    cut between characters; without ``hard``, return ("", text)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text, ""
    if max_bytes <= 0:
        return "", text
    window = data[: max_bytes + 2]
    for sep in (b"\n\n", b"\n"):
        pos = window.rfind(sep, 0, max_bytes + len(sep))
        if pos > 0:
            return data[:pos].decode("utf-8"), data[pos + len(sep) :].decode("utf-8")
    if not hard:
        return "", text
    end = max_bytes
    while end > 0 and data[end] & 0xC0 == 0x80:  # never split a UTF-8 sequence
        end -= 1
    return data[:end].decode("utf-8"), data[end:].decode("utf-8")


def build_domain_text(docs: Iterable[Doc], max_bytes: int, file_bytes: int) -> DomainText:
    """Normalise, drop empties and exact duplicates, sample to ``max_bytes``, pack into files."""
    seen: set[bytes] = set()
    unique: list[str] = []
    read = 0
    for doc in docs:
        read += 1
        text = normalise(doc.text)
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if text and key not in seen:
            seen.add(key)
            unique.append(text)
    available = sum(utf8_len(t) + len(SEPARATOR) for t in unique)
    kept = select_spread(unique, max_bytes)
    return DomainText(tuple(pack_files(kept, file_bytes)), read, len(kept), available)
