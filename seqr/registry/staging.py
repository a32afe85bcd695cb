"""The publisher's durable queue: admitted operations waiting for the next registry version.

One small JSON file per operation (``staging/<seq>.json``, written atomically), applied in
order on top of the newest version: enrol a client key, revoke one (its adapters leave with
it), add an adapter. The queue lives on disk so that a server killed between admitting an
adapter and publishing loses nothing. Applying a record twice changes nothing, so a crash
between committing a version and clearing the queue is harmless.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from seqr.core import signing
from seqr.core.errors import FormatError
from seqr.registry import store
from seqr.registry.codec import Fields, dumps, format_time, loads
from seqr.registry.metadata import (
    AdapterRecord,
    ClientKey,
    RegistryDocument,
    Revocation,
    parse_public_key_hex,
)

__all__ = ["StagedAdapter", "StagingQueue", "RegistryState"]

MAX_RECORD_BYTES = 1024 * 1024  # bytes; a record is one adapter's fields (~1 KB)
MAX_RECORDS = 100_000


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter as the targets metadata lists it: its record and each file's length/hash."""

    record: AdapterRecord
    files: dict[str, tuple[int, str]]  # file name -> (length, sha256 hex)


@dataclass(frozen=True)
class RegistryState:
    """What one registry version holds, in the terms staging changes."""

    document: RegistryDocument
    adapters: dict[str, StagedAdapter]  # adapter id -> adapter


class StagingQueue:
    """Records in ``folder``, read on every use; only the lock holder writes them."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def records(self) -> list[tuple[int, dict[str, Any]]]:
        store.ensure_dir(self.folder)
        out = []
        for item in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if item.name.endswith(".json") and item.name[:-5].isdigit():
                what = f"staging/{item.name}"
                data = store.read_capped(self.folder, item.name, MAX_RECORD_BYTES, what)
                out.append((int(item.name[:-5]), loads(data, what)))
        if len(out) > MAX_RECORDS:
            raise FormatError(f"{self.folder} holds more than {MAX_RECORDS} staged records")
        return out

    def append(self, record: dict[str, Any]) -> None:
        records = self.records()
        seq = (records[-1][0] + 1) if records else 1
        store.write_new_file(self.folder / f"{seq:012d}.json", dumps(record))

    def __len__(self) -> int:
        return len(self.records())

    def clear(self, upto: int) -> None:
        """Drop the records with sequence numbers <= ``upto`` (they are in a committed version)."""
        for seq, _ in self.records():
            if seq <= upto:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.folder / f"{seq:012d}.json")


def enrol_record(public_key: bytes, when: datetime) -> dict[str, Any]:
    return {"kind": "enrol", "public_key": public_key.hex(), "time": format_time(when)}


def revoke_record(keyid: str, reason: str, when: datetime) -> dict[str, Any]:
    return {"kind": "revoke", "keyid": keyid, "reason": reason, "time": format_time(when)}


def adapter_record(adapter: StagedAdapter) -> dict[str, Any]:
    files = {n: {"length": length, "sha256": sha} for n, (length, sha) in adapter.files.items()}
    return {"kind": "adapter", "record": adapter.record.to_custom(), "files": files}


def apply(state: RegistryState, records: list[tuple[int, dict[str, Any]]]) -> RegistryState:
    """``state`` with every record applied in order (idempotent: a record already in effect
    changes nothing; an adapter whose key is not enrolled by then is dropped)."""
    clients, revoked = dict(state.document.clients), dict(state.document.revoked)
    adapters = dict(state.adapters)
    for seq, rec in records:
        what = f"staging/{seq:012d}.json"
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind == "enrol":
            f = Fields(rec, what, ("kind", "public_key", "time"))
            public = parse_public_key_hex(f.raw("public_key"), f.path("public_key"))
            keyid = signing.fingerprint(public)
            if keyid not in revoked and keyid not in clients:
                clients[keyid] = ClientKey(keyid, public, f.time("time"))
        elif kind == "revoke":
            f = Fields(rec, what, ("kind", "keyid", "reason", "time"))
            keyid = f.text("keyid", max_len=128)
            if keyid in clients:
                public = clients.pop(keyid).public_key
                revoked[keyid] = Revocation(keyid, public, f.time("time"), f.text("reason"))
                adapters = {k: a for k, a in adapters.items() if not a.record.depends_on(keyid)}
        elif kind == "adapter":
            f = Fields(rec, what, ("kind", "record", "files"))
            record = AdapterRecord.from_custom(f.raw("record"), f.path("record"))
            files = {}
            for name, info in f.mapping("files").items():
                i = Fields(info, f"{what}.files[{name}]", ("length", "sha256"))
                files[name] = (i.integer("length"), i.hex("sha256", 32))
            signers = record.contributors if record.is_group else (record.client,)
            if all(k in clients for k in signers or ()) and record.adapter_id not in adapters:
                adapters[record.adapter_id] = StagedAdapter(record, files)
        else:
            raise FormatError(f"{what} has unknown kind {kind!r:.40}")
    document = replace(state.document, clients=clients, revoked=revoked)
    return RegistryState(document, adapters)
