"""Reading and writing the TUF repository on disk (the publisher's side; no locking here).

``load`` reads the committed state (timestamp.json names the snapshot, which names the targets)
and checks each file with python-tuf's own verification against the newest root, so the
publisher never builds on a file a client would reject. ``commit`` writes one new repository
state in the order of TUF spec 6.3 (targets, then snapshot, then timestamp): every file but
timestamp.json is new and immutable, and replacing timestamp.json is the commit point, so a
crash at any moment leaves the previous state complete for readers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from seqr.core.errors import FormatError, RegistryError
from seqr.core.manifest import ADAPTER_WEIGHTS_NAME
from seqr.registry import layout, log, roles, store
from seqr.registry.metadata import AdapterRecord, RegistryDocument
from seqr.registry.staging import RegistryState, StagedAdapter

__all__ = [
    "Committed",
    "load",
    "load_roots",
    "read_leaves",
    "read_metadata",
    "build_targets",
    "write_role",
    "write_target",
]

_CAP = 1 << 40  # the publisher reads only files it wrote itself; clients have real caps


@dataclass(frozen=True)
class Committed:
    """The newest complete repository state."""

    roots: tuple[Metadata[Root], ...]  # every root version, oldest first
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    state: RegistryState
    head: log.TreeHead

    @property
    def root(self) -> Root:
        return self.roots[-1].signed


def _read(path: Path, rel: str) -> bytes | None:
    return store.read_optional(path, rel, _CAP, rel)


def metadata_rel(name: str) -> str:
    return f"{layout.METADATA}/{name}"


def read_metadata(path: Path, name: str) -> bytes | None:
    """metadata/<name>, or None if it does not exist."""
    return _read(path, metadata_rel(name))


def load_roots(path: Path) -> tuple[Metadata[Root], ...]:
    """Every N.root.json, each verified by its predecessor's threshold and its own."""
    roots: list[Metadata[Root]] = []
    while (data := _read(path, metadata_rel(layout.root_name(len(roots) + 1)))) is not None:
        md = roles.parse(data, Root, layout.root_name(len(roots) + 1))
        if md.signed.version != len(roots) + 1:
            raise RegistryError(f"{layout.root_name(len(roots) + 1)} holds another version")
        previous = roots[-1].signed if roots else None
        result = md.signed.get_root_verification_result(
            previous, md.signed_bytes, md.signatures
        )  # spec 5.3.4: the old threshold AND the new one
        if not result:
            raise RegistryError(f"{layout.root_name(len(roots) + 1)} is not a valid rotation")
        roots.append(md)
    if not roots:
        raise RegistryError(
            f"{path} has no {layout.METADATA}/1.root.json: not a registry (create one with "
            "`seqr server init`)"
        )
    return tuple(roots)


def load(path: Path) -> Committed:
    roots = load_roots(path)
    # Signed under the newest root, or under the one before while a rotation is completing
    # (root N+1 written, the other roles not yet re-signed by its keys).
    signers = tuple(r.signed for r in roots[-2:])
    ts_data = _read(path, metadata_rel("timestamp.json"))
    if ts_data is None:
        raise RegistryError(f"{path} has no timestamp.json: its creation did not finish")
    timestamp = roles.parse(ts_data, Timestamp, "timestamp.json")
    _check_signed_by_any(signers, timestamp, "timestamp.json")
    snap_version = timestamp.signed.snapshot_meta.version
    snapshot = _load_role(path, signers, Snapshot, snap_version)
    targets_version = snapshot.signed.meta["targets.json"].version
    targets = _load_role(path, signers, Targets, targets_version)
    head = log.TreeHead.from_field(
        snapshot.signed.unrecognized_fields.get(layout.LOG_FIELD), layout.LOG_FIELD
    )
    return Committed(roots, timestamp, snapshot, targets, state_of(path, targets.signed), head)


def _check_signed_by_any(signers: tuple[Root, ...], md: Metadata[Any], what: str) -> None:
    for root in signers[:-1]:
        try:
            roles.check_signed(root, md.signed.type, md, what)
            return
        except RegistryError:
            pass
    roles.check_signed(signers[-1], md.signed.type, md, what)


def _load_role(
    path: Path, signers: tuple[Root, ...], cls: type[Any], version: int
) -> Metadata[Any]:
    name = layout.versioned_name(cls.type, version)
    data = _read(path, metadata_rel(name))
    if data is None:
        raise RegistryError(f"{name} is missing from {path}")
    md = roles.parse(data, cls, name)
    _check_signed_by_any(signers, md, name)
    if md.signed.version != version:
        raise RegistryError(f"{name} holds version {md.signed.version}")
    return md


def state_of(path: Path, targets: Targets) -> RegistryState:
    """The registry document and the adapters a targets version lists."""
    info = targets.targets.get(layout.REGISTRY_TARGET)
    if info is None:
        raise RegistryError(f"targets metadata lists no {layout.REGISTRY_TARGET}")
    data = read_target(path, info, _CAP)
    document = RegistryDocument.from_bytes(data)
    files: dict[str, dict[str, tuple[int, str]]] = {}
    records: dict[str, AdapterRecord] = {}
    for target_path, target in targets.targets.items():
        parsed = layout.parse_adapter_target(target_path)
        if parsed is None:
            continue
        adapter_id, name = parsed
        files.setdefault(adapter_id, {})[name] = (target.length, target.hashes["sha256"])
        if name == ADAPTER_WEIGHTS_NAME:
            records[adapter_id] = record_of(target, target_path)
    adapters = {i: StagedAdapter(records[i], files[i]) for i in records}
    return RegistryState(document, adapters)


def record_of(target: TargetFile, what: str) -> AdapterRecord:
    custom = target.custom
    if not isinstance(custom, dict) or layout.SEQR_CUSTOM not in custom:
        raise FormatError(f"{what} carries no seqr fields in its custom metadata")
    record = AdapterRecord.from_custom(custom[layout.SEQR_CUSTOM], f"{what}.custom.seqr")
    if layout.adapter_target(record.adapter_id, ADAPTER_WEIGHTS_NAME) != what:
        raise FormatError(f"{what} carries the seqr fields of adapter {record.adapter_id[:16]}")
    return record


def read_target(path: Path, info: TargetFile, cap: int) -> bytes:
    rel = f"{layout.TARGETS}/{layout.stored_target_name(info.path, info.hashes['sha256'])}"
    data = store.read_capped(path, rel, min(cap, info.length), info.path)
    info.verify_length_and_hashes(data)
    return data


def read_leaves(path: Path, version: int) -> list[bytes]:
    """Log leaf hashes of targets versions 1..version."""
    out = []
    for v in range(1, version + 1):
        data = _read(path, metadata_rel(layout.versioned_name("targets", v)))
        if data is None:
            raise RegistryError(f"targets version {v} is missing: the log needs every version")
        out.append(log.leaf_of(data))
    return out


def write_target(path: Path, target_path: str, data: bytes) -> TargetFile:
    """Store one target file under its hash-prefixed name; its TUF target info."""
    sha = hashlib.sha256(data).hexdigest()
    rel = f"{layout.TARGETS}/{layout.stored_target_name(target_path, sha)}"
    store.write_new_file(path / rel, data)
    return TargetFile(len(data), {"sha256": sha}, target_path)


def build_targets(path: Path, state: RegistryState, version: int, expires: datetime) -> Targets:
    targets = {layout.REGISTRY_TARGET: write_target(
        path, layout.REGISTRY_TARGET, state.document.to_bytes()
    )}  # fmt: skip
    for adapter_id, adapter in sorted(state.adapters.items()):
        for name, (length, sha) in sorted(adapter.files.items()):
            target_path = layout.adapter_target(adapter_id, name)
            extra = None
            if name == ADAPTER_WEIGHTS_NAME:
                extra = {"custom": {layout.SEQR_CUSTOM: adapter.record.to_custom()}}
            targets[target_path] = TargetFile(length, {"sha256": sha}, target_path, extra)
    return Targets(version=version, expires=expires, targets=targets)


def write_role(path: Path, root: Root, signers: Sequence[CryptoSigner], signed: Any) -> bytes:
    """Sign one role version, verify it as a client would, write it; its bytes.

    Every file but timestamp.json is new and immutable; replacing timestamp.json is the
    commit point of a publish (spec 6.3)."""
    md = Metadata(signed)
    data = roles.sign(md, signers)
    name = layout.versioned_name(md.signed.type, md.signed.version)
    roles.check_signed(root, md.signed.type, roles.parse(data, type(md.signed), name), name)
    if md.signed.type == Timestamp.type:
        store.write_file(path / metadata_rel(name), data)
    else:
        store.write_new_file(path / metadata_rel(name), data)
    return data
