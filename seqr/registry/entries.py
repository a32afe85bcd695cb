"""Verify one adapter of a registry version from its bytes (pure: no I/O).

TUF has already bound every file to the signed targets metadata (length and SHA-256, checked
as it was downloaded or read). What seqr adds, each check naming its attack (docs/THREATS.md):

- the export carries exactly the files its signed record lists, and the record's manifest and
  statistics hashes are those files' (mix-and-match inside an adapter);
- the model-signing bundle verifies over every file with the key the manifest names
  (seqr.core.manifest.verify_export_files), and that key is the record's client: an
  allow-listed, unrevoked client key, or for a group adapter one of the root's server keys,
  with every contributor allow-listed (unknown / revoked key, arbitrary installation);
- the manifest agrees with the registry's federation pin (wrong software);
- the statistics parse and are usable; the weights are real safetensors with finite floats in
  the registry's tensor layout; a group adapter's contributions verify (contributions.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from seqr.core.errors import FormatError, RegistryError, SeqrError
from seqr.core.manifest import (
    ADAPTER_WEIGHTS_NAME,
    EXPORT_PAYLOAD_NAMES,
    MANIFEST_NAME,
    NORM_STATS_NAME,
    SIGNATURE_NAME,
    Manifest,
    verify_export_files,
)
from seqr.core.safetensors_check import load_float_tensors, parse_safetensors_header
from seqr.core.shared_a import shared_a_mismatches_in_file
from seqr.core.stats import NormStatistics
from seqr.core.value_bounds import StatsBounds, WeightBounds, check_statistics, check_weights
from seqr.registry.adapter_check import check_adapter_weights
from seqr.registry.contributions import ContributionsReport, verify_contributions
from seqr.registry.metadata import (
    CONTRIBUTIONS_FILE,
    AdapterRecord,
    FederationPin,
    RegistryDocument,
    TensorSpec,
)

__all__ = ["EntryReport", "EXPORT_FILES", "GROUP_FILES", "verify_adapter"]

# Every file of a client's signed export; a group adapter adds its contributions.
EXPORT_FILES = tuple(sorted(EXPORT_PAYLOAD_NAMES | {MANIFEST_NAME, SIGNATURE_NAME}))
GROUP_FILES = tuple(sorted((*EXPORT_FILES, CONTRIBUTIONS_FILE)))


@dataclass(frozen=True)
class EntryReport:
    """One verified adapter, as the audit report lists it."""

    adapter_sha256: str
    manifest_sha256: str  # the exact manifest.json bytes the client signed
    client: str  # full fingerprint of the key that signed the export
    name: str  # the manifest's adapter/domain label
    admitted: datetime
    size_bytes: int
    layout: Mapping[str, TensorSpec]
    contributors: tuple[str, ...] = ()  # a group adapter's contributing client key ids
    group_rounds: int = 0  # rounds of the group run (0: not a group adapter)
    examples_by_client: Mapping[str, int] | None = None  # signed example counts (groups)


def verify_adapter(
    record: AdapterRecord,
    files: Mapping[str, bytes],
    document: RegistryDocument,
    *,
    is_server_key: Callable[[bytes], bool],
) -> tuple[EntryReport, Manifest]:
    """Verify one adapter's files against its signed record; RegistryError names it."""
    label = f"adapter {record.name!r} ({record.adapter_id[:16]}, key {record.client})"
    try:
        manifest, group, layout = _verify(record, files, document, is_server_key)
    except RegistryError as exc:
        raise RegistryError(f"{label}: {exc}") from None
    except (SeqrError, ValueError) as exc:  # FormatError, SignatureError, ShapeError, ...
        raise RegistryError(f"{label}: {exc}") from None
    report = EntryReport(
        adapter_sha256=record.adapter_id,
        manifest_sha256=record.manifest_sha256,
        client=record.client,
        name=record.name,
        admitted=record.admitted,
        size_bytes=sum(len(b) for b in files.values()),
        layout=layout,
        contributors=() if group is None else group.contributors,
        group_rounds=0 if group is None else group.rounds,
        examples_by_client=None if group is None else group.examples_by_client(),
    )
    return report, manifest


def _verify(
    record: AdapterRecord,
    files: Mapping[str, bytes],
    document: RegistryDocument,
    is_server_key: Callable[[bytes], bool],
) -> tuple[Manifest, ContributionsReport | None, dict[str, TensorSpec]]:
    expected = GROUP_FILES if record.is_group else EXPORT_FILES
    if record.files != expected or set(files) != set(expected):
        raise RegistryError(
            f"holds files {sorted(files)}, its signed record lists {list(record.files)}; "
            f"an adapter has exactly {list(expected)}"
        )
    if hashlib.sha256(files[ADAPTER_WEIGHTS_NAME]).hexdigest() != record.adapter_id:
        raise RegistryError("its weights are not the ones its id names (content address)")
    for name, digest in ((MANIFEST_NAME, record.manifest_sha256),
                         (NORM_STATS_NAME, record.stats_sha256)):  # fmt: skip
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise RegistryError(f"{name} is not the file its signed record names")
    manifest = verify_export_files(files)  # the model-signing bundle over every file
    if manifest.fingerprint != record.client:
        raise RegistryError(f"its export is signed by {manifest.fingerprint}, not {record.client}")
    if manifest.name != record.name:
        raise RegistryError(f"its manifest names it {manifest.name!r}, the record {record.name!r}")
    group = None
    if record.is_group:
        if not is_server_key(manifest.public_key_bytes):
            raise RegistryError("a group adapter must be signed by a server key of the root")
        for keyid in record.contributors or ():
            _check_client(keyid, document, "a contributor")
        group = verify_contributions(
            files[CONTRIBUTIONS_FILE],
            group=manifest.name,
            adapter_weights=files[ADAPTER_WEIGHTS_NAME],
            stats_bytes=files[NORM_STATS_NAME],
            example_count=manifest.example_count,
        )
        if group.contributors != record.contributors:
            raise RegistryError(
                f"its record lists contributors {list(record.contributors or ())} but "
                f"{CONTRIBUTIONS_FILE} is signed by {list(group.contributors)}"
            )
    else:
        client = _check_client(record.client, document, "its signer")
        if client != manifest.public_key_bytes:
            raise RegistryError("its signer's key differs from the allow-listed key")
    _check_pin(manifest, document.federation)
    # The same bounds admission applies, in the dtype routers compute in (float32).
    check_statistics(NormStatistics.from_json_bytes(files[NORM_STATS_NAME]), StatsBounds())
    weights = files[ADAPTER_WEIGHTS_NAME]
    layout = check_adapter_weights(weights, rank=manifest.rank, spec=document.tensor_spec)
    check_weights(load_float_tensors(weights, parse_safetensors_header(weights)), WeightBounds())
    wrong_a = shared_a_mismatches_in_file(weights, manifest.a_seed)
    if wrong_a:
        raise RegistryError(
            f"its lora_A of {wrong_a[:3]} is not the federation's shared A (seed "
            f"{manifest.a_seed}): SEQR's shared projection would not hold"
        )
    return manifest, group, layout


def _check_client(keyid: str, document: RegistryDocument, who: str) -> bytes:
    if keyid in document.revoked:
        revocation = document.revoked[keyid]
        raise RegistryError(
            f"{who} {keyid} was revoked on {revocation.revoked:%Y-%m-%d} "
            f"({revocation.reason!r}); its adapters must leave the registry"
        )
    client = document.clients.get(keyid)
    if client is None:
        raise RegistryError(f"{who} {keyid} is not on the registry's allow-list: unknown key")
    return client.public_key


def _check_pin(manifest: Manifest, pin: FederationPin | None) -> None:
    if pin is None:
        return
    mine = (manifest.base_model_sha256, manifest.a_sha256, manifest.a_seed, manifest.rank)
    pinned = (pin.base_model_sha256, pin.a_sha256, pin.a_seed, pin.rank)
    if mine != pinned or manifest.target_modules != tuple(sorted(pin.target_modules)):
        raise FormatError(
            f"manifest (base model {manifest.base_model_sha256[:12]}, A {manifest.a_sha256[:12]}, "
            f"seed {manifest.a_seed}, rank {manifest.rank}, {list(manifest.target_modules)}) "
            "does not match the registry's federation pin: an adapter for another model"
        )
