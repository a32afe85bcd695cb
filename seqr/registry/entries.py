"""Verify what a registry version lists: the allow-list, and each adapter's files (pure).

``check_listing`` runs on metadata alone (every audited version); ``verify_entry`` runs on the
bytes of one adapter folder (the newest version; the publisher runs it before signing). An
entry is good only if ALL of these hold (each check names its attack, SECURITY.md):

- every export file is present (a missing model.sig is a missing client signature) and
  exactly as long as the entry says (endless data) with the hash the entry says;
- model.sig is a model-signing bundle by the entry's client key (the key manifest.json names)
  over exactly the other files, with their hashes (seqr.core.manifest.verify_export_files);
- the client key is allow-listed in this version and not revoked (unknown / revoked key);
- the manifest agrees with the registry's federation pin (wrong software), the statistics
  parse, and the weights are real safetensors with finite floats and the agreed shapes.

A group adapter (``Entry.contributors``) is signed by a server key (verify.py checks it
against the root) instead of an allow-listed client, and must also carry contributions.json:
every contributor allow-listed and unrevoked, every contribution signature valid, and the
statistics the exact merge of the signed partial ones (contributions.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from seqr.core.errors import FormatError, RegistryError, SeqrError
from seqr.core.manifest import Manifest, verify_export_files
from seqr.core.stats import NormStatistics
from seqr.registry.adapter_check import check_adapter_weights
from seqr.registry.contributions import verify_contributions
from seqr.registry.metadata import (
    ADAPTER_FILE,
    CONTRIBUTIONS_FILE,
    MANIFEST_FILE,
    MANIFEST_SIG_FILE,
    STATS_FILE,
    Entry,
    FederationPin,
    RegistryMetadata,
    TensorSpec,
)

__all__ = ["EntryReport", "check_listing", "verify_entry", "check_entry_files"]


@dataclass(frozen=True)
class EntryReport:
    """One verified adapter, as the audit report lists it."""

    adapter_sha256: str
    manifest_sha256: str  # the exact manifest.json bytes the client signed
    client: str
    name: str  # the manifest's adapter/domain label
    admitted: datetime
    size_bytes: int
    layout: Mapping[str, TensorSpec]
    contributors: tuple[str, ...] = ()  # a group adapter's contributing client key ids
    group_rounds: int = 0  # rounds of the group run (0: not a group adapter)
    examples_by_client: Mapping[str, int] | None = None  # signed example counts (groups)


def check_listing(metadata: RegistryMetadata, what: str) -> None:
    """Allow-list and uniqueness checks that need no file (run on every audited version)."""
    both = metadata.clients.keys() & metadata.revoked.keys()
    if both:
        raise RegistryError(f"{what}: client key(s) {sorted(both)} are both allowed and revoked")
    seen: set[str] = set()
    for entry in metadata.entries:
        label = f"{what}: adapter {entry.adapter_sha256[:16]}"
        if entry.adapter_sha256 in seen:
            raise RegistryError(f"{label} is listed twice; each adapter may appear once")
        seen.add(entry.adapter_sha256)
        if entry.files[ADAPTER_FILE].sha256 != entry.adapter_sha256:
            raise RegistryError(
                f"{label} is stored under a name that is not the SHA-256 of its weights "
                f"({entry.files[ADAPTER_FILE].sha256[:16]}...)"
            )
        if entry.contributors is not None:
            _check_contributors(entry, metadata, label)
            continue  # signed by a server key: verify.py checks it against the root
        if entry.client in metadata.revoked:
            raise RegistryError(
                f"{label} is signed by revoked client key {entry.client} "
                f"(revoked {metadata.revoked[entry.client].revoked:%Y-%m-%d}: "
                f"{metadata.revoked[entry.client].reason}); its adapters must leave the registry"
            )
        client = metadata.clients.get(entry.client)
        if client is None or client.public_key != entry.client_key:
            raise RegistryError(
                f"{label} is signed by client key {entry.client}, which is not on this "
                "registry's allow-list (metadata 'clients'): unknown client key"
            )


def _check_contributors(entry: Entry, metadata: RegistryMetadata, label: str) -> None:
    for keyid in entry.contributors or ():
        if keyid in metadata.revoked:
            raise RegistryError(
                f"{label} is a group adapter with a contribution by revoked client key {keyid}; "
                "it must leave the registry with that key"
            )
        if keyid not in metadata.clients:
            raise RegistryError(
                f"{label} is a group adapter with a contribution by client key {keyid}, which "
                "is not on this registry's allow-list: unknown client key"
            )


def check_entry_files(entry: Entry, files: Mapping[str, bytes]) -> None:
    """Presence, lengths and the hashes of manifest.json / model.sig (cheap, before parsing)."""
    for name in entry.files:
        if name not in files:
            if name == MANIFEST_SIG_FILE:
                raise RegistryError(
                    f"{MANIFEST_SIG_FILE} is missing: the client's model-signing bundle over "
                    "the export is required for every adapter"
                )
            raise RegistryError(f"{name} is missing from {entry.directory}/")
        declared, actual = entry.files[name].length, len(files[name])
        if actual != declared:
            raise RegistryError(
                f"{name} is {'more than ' if actual > declared else ''}{actual} bytes but the "
                f"signed entry says {declared} (endless data or truncation)"
            )
    for name in (MANIFEST_FILE, MANIFEST_SIG_FILE):
        digest = hashlib.sha256(files[name]).hexdigest()
        if digest != entry.files[name].sha256:
            raise RegistryError(
                f"{name} has SHA-256 {digest[:16]}... but the signed entry says "
                f"{entry.files[name].sha256[:16]}...: the file was changed"
            )


def _check_manifest(entry: Entry, manifest: Manifest, pin: FederationPin | None) -> None:
    if manifest.public_key_bytes != entry.client_key:
        raise RegistryError(
            f"manifest is signed by {manifest.fingerprint}, but the entry says {entry.client}"
        )
    if pin is not None:
        mine = (manifest.base_model_sha256, manifest.a_sha256, manifest.a_seed, manifest.rank)
        pinned = (pin.base_model_sha256, pin.a_sha256, pin.a_seed, pin.rank)
        if mine != pinned or manifest.target_modules != tuple(sorted(pin.target_modules)):
            raise RegistryError(
                f"manifest (base model {manifest.base_model_sha256[:12]}, "
                f"A {manifest.a_sha256[:12]}, seed {manifest.a_seed}, rank {manifest.rank}, "
                f"{list(manifest.target_modules)}) "
                "does not match the registry's federation pin: adapter for another model"
            )


def verify_entry(
    entry: Entry,
    files: Mapping[str, bytes],
    *,
    tensor_spec: Mapping[str, TensorSpec] | None,
    federation: FederationPin | None,
) -> EntryReport:
    """Verify one adapter folder's bytes against its signed entry; RegistryError names it.

    ``tensor_spec`` and ``federation`` come from the registry version that lists the entry.
    """
    try:
        check_entry_files(entry, files)
        # Signature over the exact manifest bytes, then every payload file against it.
        manifest = verify_export_files({n: files[n] for n in entry.files})
        # The bundle covers these exact bytes; the signed entry must name the same ones.
        for name in sorted(set(entry.files) - {MANIFEST_FILE, MANIFEST_SIG_FILE}):
            if hashlib.sha256(files[name]).hexdigest() != entry.files[name].sha256:
                raise RegistryError(
                    f"{name}: the client signed SHA-256 "
                    f"{hashlib.sha256(files[name]).hexdigest()[:16]}... but the registry entry "
                    f"says {entry.files[name].sha256[:16]}..."
                )
        _check_manifest(entry, manifest, federation)
        NormStatistics.from_json_bytes(files[STATS_FILE])
        layout = check_adapter_weights(files[ADAPTER_FILE], rank=manifest.rank, spec=tensor_spec)
        group = None
        if entry.contributors is not None:
            group = verify_contributions(
                files[CONTRIBUTIONS_FILE],
                group=manifest.name,
                adapter_weights=files[ADAPTER_FILE],
                stats_bytes=files[STATS_FILE],
                example_count=manifest.example_count,
            )
            if group.contributors != entry.contributors:
                raise RegistryError(
                    f"the entry lists contributors {list(entry.contributors)} but "
                    f"{CONTRIBUTIONS_FILE} is signed by {list(group.contributors)}"
                )
    except RegistryError as exc:
        raise RegistryError(f"adapter {entry.adapter_sha256[:16]} ({entry.client}): {exc}") from exc
    except (SeqrError, ValueError) as exc:  # FormatError, SignatureError, ShapeError, ...
        kind = "malformed" if isinstance(exc, FormatError) else type(exc).__name__
        raise RegistryError(
            f"adapter {entry.adapter_sha256[:16]} ({entry.client}): {kind}: {exc}"
        ) from exc
    return EntryReport(
        adapter_sha256=entry.adapter_sha256,
        manifest_sha256=entry.files[MANIFEST_FILE].sha256,
        client=entry.client,
        name=manifest.name,
        admitted=entry.admitted,
        size_bytes=sum(len(b) for b in files.values()),
        layout=layout,
        contributors=() if group is None else group.contributors,
        group_rounds=0 if group is None else group.rounds,
        examples_by_client=None if group is None else group.examples_by_client(),
    )
