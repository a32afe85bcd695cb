"""The publisher's durable queue: admitted operations waiting for the next registry version.

One small JSON file per operation (``staging/<seq>.json``, written atomically), applied in
sequence order on top of the newest version: enrol a client key, revoke one (its adapters
leave with it), add an adapter entry. The queue lives on disk so that a server killed
between admitting an adapter and publishing loses nothing: the next publish includes it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from seqr.core import signing
from seqr.core.errors import FormatError
from seqr.registry import store
from seqr.registry.codec import Fields, dumps, loads
from seqr.registry.metadata import ClientKey, Entry, RegistryMetadata, Revocation

__all__ = ["StagingQueue"]

MAX_RECORD_BYTES = 1024 * 1024  # bytes; a record is one entry (~1 KB)


class StagingQueue:
    """Records in ``folder``, loaded once; the publisher is the only writer (it holds a lock)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.records: list[tuple[int, dict[str, Any]]] = []
        for item in sorted(os.scandir(self.folder), key=lambda e: e.name):
            if item.name.endswith(".json") and item.name[:-5].isdigit():
                data = store.read_capped(Path(item.path), MAX_RECORD_BYTES, item.name)
                self.records.append((int(item.name[:-5]), loads(data, item.name)))

    def append(self, record: dict[str, Any]) -> None:
        seq = (self.records[-1][0] + 1) if self.records else 1
        store.write_file(self.folder / f"{seq:012d}.json", dumps(record))
        self.records.append((seq, record))

    def apply(
        self, meta: RegistryMetadata
    ) -> tuple[dict[str, ClientKey], dict[str, Revocation], dict[str, Entry]]:
        """Clients, revocations and entries (by adapter SHA-256) once the queue is applied."""
        clients = dict(meta.clients)
        revoked = dict(meta.revoked)
        entries = {e.adapter_sha256: e for e in meta.entries}
        for seq, rec in self.records:
            kind = rec.get("kind") if isinstance(rec, dict) else None
            what = f"staging/{seq:012d}.json"
            if kind == "enrol":
                f = Fields(rec, what, ("kind", "public_key", "time"))
                public = bytes.fromhex(f.hex("public_key", signing.PUBLIC_KEY_BYTES))
                keyid = signing.fingerprint(public)
                if keyid not in revoked:
                    clients.setdefault(keyid, ClientKey(keyid, public, f.time("time")))
            elif kind == "revoke":
                f = Fields(rec, what, ("kind", "keyid", "reason", "time"))
                keyid = f.text("keyid")
                if keyid in clients and keyid not in revoked:
                    public = clients.pop(keyid).public_key
                    revoked[keyid] = Revocation(keyid, public, f.time("time"), f.text("reason"))
                    entries = {h: e for h, e in entries.items() if not e.depends_on(keyid)}
            elif kind == "adapter":
                f = Fields(rec, what, ("kind", "entry"))
                entry = Entry.from_json(f.raw("entry"), what)
                # A group adapter is signed by a server key: its contributors must be enrolled.
                signers = entry.contributors if entry.contributors is not None else [entry.client]
                if all(k in clients for k in signers) and entry.adapter_sha256 not in entries:
                    entries[entry.adapter_sha256] = entry
            else:
                raise FormatError(f"{what} has unknown kind {kind!r}")
        return clients, revoked, entries

    def clear(self) -> None:
        """Drop every record once a committed version was built from all of them (publish is
        synchronous; a rolled-forward version was built from the queue found at restart)."""
        for seq, _ in self.records:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / f"{seq:012d}.json")
        self.records = []
