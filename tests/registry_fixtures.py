"""Builds real signed client exports and registries fast, and mounts attacks on them.

Exports are built in memory (tiny safetensors: one layer, q_proj and v_proj, r = 2, d = 4;
real NormStatistics; a real OpenSSF model-signing bundle made by model-signing with the
client's ECDSA P-256 key). ``forge`` plays a malicious or buggy server (python-tuf
RepositorySimulator style): it takes the newest targets metadata, lets a test change it, signs
it with whatever keys it is given and commits it like the publisher would (targets, a snapshot
with a correct RFC 9162 tree head, timestamp), so that only the check under test can catch
the change.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from safetensors.numpy import save
from tuf.api.metadata import Metadata, Snapshot, TargetFile, Targets, Timestamp

from seqr.core import key_files, signing
from seqr.core.manifest import Manifest
from seqr.core.model_signature import sign_files
from seqr.core.shared_a import generate_shared_a, shared_a_sha256
from seqr.core.stats import NormStatistics
from seqr.registry import layout, log, repository, roles
from seqr.registry.config import PublisherConfig
from seqr.registry.metadata import AdapterRecord, FederationPin
from seqr.registry.publish import Publisher

# Registry clients check expiry against the real clock (python-tuf ngclient), so the tests'
# registries are made now.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
RANK, DIM = 2, 4
TARGETS = ("q_proj", "v_proj")
BASE_SHA = hashlib.sha256(b"tiny base model").hexdigest()
A_SEED = 1234
MODULES = tuple(f"model.layers.0.self_attn.{m}" for m in TARGETS)


def tensor_name(module: str, which: str) -> str:
    return f"base_model.model.model.layers.0.self_attn.{module}.lora_{which}.weight"


def shared_a() -> dict[str, np.ndarray]:
    """The federation's real shared A (seqr.core.shared_a), which every audit checks."""
    return {
        tensor_name(m, "A"): generate_shared_a(
            A_SEED, f"model.layers.0.self_attn.{m}", RANK, DIM
        ).numpy()
        for m in TARGETS
    }


A_SHA = shared_a_sha256(A_SEED, {f"model.layers.0.self_attn.{m}": DIM for m in TARGETS}, RANK)
FEDERATION = FederationPin(BASE_SHA, A_SHA, A_SEED, RANK, TARGETS)


def make_tensors(seed: int = 0, rank: int = RANK) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    tensors = dict(shared_a()) if rank == RANK else {}
    for m in TARGETS:
        if rank != RANK:
            tensors[tensor_name(m, "A")] = rng.standard_normal((rank, DIM)).astype(np.float32)
        tensors[tensor_name(m, "B")] = rng.standard_normal((DIM, rank)).astype(np.float32)
    return tensors


def make_stats(mean: float = 5.0, std: float = 1.0) -> bytes:
    stats = NormStatistics()
    values = np.array([mean - std, mean + std] * 16)
    for module in MODULES:
        stats.update(module, values)
    return stats.to_json_bytes()


_KEY_FILES = Path(tempfile.mkdtemp(prefix="seqr-test-keys-"))
atexit.register(shutil.rmtree, _KEY_FILES, True)


def key_file(key: EllipticCurvePrivateKey) -> key_files.SigningKeyFile:
    """``key`` as a key file: model-signing signs from a file (test keys only, 0600, removed
    at exit)."""
    path = _KEY_FILES / (signing.fingerprint(signing.public_key_bytes(key))[7:23] + ".pem")
    if not path.exists():
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.touch(mode=0o600)
        path.write_bytes(pem)
    return key_files.SigningKeyFile.open(path)


def manifest_bytes(key: EllipticCurvePrivateKey, *, name: str = "adapter", **over: Any) -> bytes:
    """manifest.json bytes naming ``key``."""
    fields: dict[str, Any] = {
        "base_model_sha256": BASE_SHA,
        "a_seed": A_SEED,
        "a_sha256": A_SHA,
        "rank": RANK,
        "alpha": 4.0,
        "target_modules": TARGETS,
        "public_key": signing.public_key_bytes(key).hex(),
        "created": T0,
        "name": name,
        "example_count": 100,
    }
    fields.update(over)
    return Manifest(**fields).to_bytes()


def sign_export_files(
    key: EllipticCurvePrivateKey, files: Mapping[str, bytes], *, name: str = "adapter"
) -> dict[str, bytes]:
    """``files`` plus model.sig, the model-signing bundle over all of them made with ``key``."""
    return {**files, "model.sig": sign_files(files, key_file(key), name=name)}


def make_export(
    key: EllipticCurvePrivateKey,
    seed: int = 0,
    *,
    tensors: Mapping[str, np.ndarray] | None = None,
    weights: bytes | None = None,
    stats: bytes | None = None,
    name: str | None = None,
    **manifest: Any,
) -> dict[str, bytes]:
    """A complete signed export, name -> bytes, as a client sends it."""
    if weights is None:
        weights = save(dict(tensors if tensors is not None else make_tensors(seed)))
    payload = {
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": RANK}).encode(),
        "adapter_model.safetensors": weights,
        "norm_stats.json": stats if stats is not None else make_stats(5.0 + seed),
    }
    name = name or f"domain-{seed}"
    data = manifest_bytes(key, name=name, **manifest)
    return sign_export_files(key, {**payload, "manifest.json": data}, name=name)


def new_key() -> EllipticCurvePrivateKey:
    return signing.generate_private_key()


def build_registry(
    path: Path,
    server_keys: Sequence[EllipticCurvePrivateKey],
    clients: Sequence[EllipticCurvePrivateKey],
    *,
    threshold: int = 1,
    root_keys: Sequence[bytes] | None = None,
    config: PublisherConfig | None = None,
    now: datetime = T0,
) -> Publisher:
    """Version 1 (empty) and version 2 with one adapter per client; returns the publisher."""
    config = config or PublisherConfig(federation=FEDERATION)
    pub = Publisher.create(
        path, server_keys, root_keys=root_keys, threshold=threshold, config=config, now=now
    )
    for i, client in enumerate(clients):
        pub.enrol_client(signing.public_key_bytes(client), now=now)
        pub.stage_adapter(make_export(client, seed=i), admitted=now)
    pub.publish(now=now + timedelta(minutes=1))
    return pub


def forge(
    path: Path,
    keys: Sequence[Any],
    mutate: Callable[[Targets], None] | None = None,
    *,
    now: datetime | None = None,
    expires: timedelta = timedelta(days=7),
    snapshot_keys: Sequence[Any] | None = None,
    tree_head: log.TreeHead | None = None,
) -> int:
    """Commit targets version N+1 = the newest targets changed by ``mutate``, signed by
    ``keys``, with a snapshot (correct tree head unless given) and a timestamp; returns N+1."""
    now = now or datetime.now(UTC).replace(microsecond=0)
    meta = path / "metadata"
    timestamp_md = Metadata[Timestamp].from_bytes((meta / "timestamp.json").read_bytes())
    snap_version = timestamp_md.signed.snapshot_meta.version
    snapshot_md = Metadata[Snapshot].from_bytes(
        (meta / f"{snap_version}.snapshot.json").read_bytes()
    )
    targets_version = snapshot_md.signed.meta["targets.json"].version
    current = Metadata[Targets].from_bytes((meta / f"{targets_version}.targets.json").read_bytes())
    targets = Targets.from_dict(current.signed.to_dict())
    targets.version += 1
    targets.expires = now + expires
    if mutate is not None:
        mutate(targets)
    signers = [roles.signer_for(k) for k in keys]
    data = roles.sign(Metadata(targets), signers)
    (path / "metadata" / f"{targets.version}.targets.json").write_bytes(data)
    leaves = [*repository.read_leaves(path, targets.version - 1), log.leaf_of(data)]
    snapshot = Snapshot(
        version=snapshot_md.signed.version + 1,
        expires=now + expires,
        meta={"targets.json": roles.meta_file(targets.version, data)},
        unrecognized_fields={
            layout.LOG_FIELD: (tree_head or log.TreeHead.of(leaves, now)).to_field()
        },
    )
    snap_signers = [roles.signer_for(k) for k in snapshot_keys] if snapshot_keys else signers
    snap_data = roles.sign(Metadata(snapshot), snap_signers)
    (path / "metadata" / f"{snapshot.version}.snapshot.json").write_bytes(snap_data)
    timestamp = Timestamp(
        version=timestamp_md.signed.version + 1,
        expires=now + expires,
        snapshot_meta=roles.meta_file(snapshot.version, snap_data),
    )
    (path / "metadata" / "timestamp.json").write_bytes(
        roles.sign(Metadata(timestamp), snap_signers)
    )
    return targets.version


def add_target_files(
    path: Path, adapter_id: str, files: Mapping[str, bytes]
) -> dict[str, TargetFile]:
    """Store files under targets/ as a publisher would; their TUF target infos."""
    out = {}
    for name, data in files.items():
        target_path = layout.adapter_target(adapter_id, name)
        sha = hashlib.sha256(data).hexdigest()
        stored = path / "targets" / layout.stored_target_name(target_path, sha)
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(data)
        out[target_path] = TargetFile(len(data), {"sha256": sha}, target_path)
    return out


def record_for(files: Mapping[str, bytes], signer: Any, **over: Any) -> AdapterRecord:
    """The seqr record a (malicious) server would sign for these files."""
    fields: dict[str, Any] = {
        "adapter_id": hashlib.sha256(files["adapter_model.safetensors"]).hexdigest(),
        "name": json.loads(files["manifest.json"])["name"],
        "client": signing.fingerprint(signing.public_key_bytes(signer)),
        "admitted": T0,
        "manifest_sha256": hashlib.sha256(files["manifest.json"]).hexdigest(),
        "stats_sha256": hashlib.sha256(files["norm_stats.json"]).hexdigest(),
        "files": tuple(sorted(files)),
    }
    fields.update(over)
    return AdapterRecord(**fields)


def inject_adapter(
    path: Path,
    server_keys: Sequence[EllipticCurvePrivateKey],
    client: EllipticCurvePrivateKey,
    files: Mapping[str, bytes],
    record: AdapterRecord | None = None,
) -> int:
    """A server that skips its own checks: store ``files`` and list them in a new version."""
    record = record or record_for(files, client)
    infos = add_target_files(path, record.adapter_id, files)
    weights = layout.adapter_target(record.adapter_id, "adapter_model.safetensors")
    infos[weights].unrecognized_fields["custom"] = {layout.SEQR_CUSTOM: record.to_custom()}
    return forge(path, server_keys, lambda t: t.targets.update(infos))


def stored_files(path: Path, index: int = 0) -> dict[str, Path]:
    """File name -> stored path of the ``index``-th adapter of the newest version."""
    targets = repository.load(path).targets.signed.targets
    ids = sorted({p.split("/")[1] for p in targets if p.startswith("adapters/")})
    out = {}
    for target_path, info in targets.items():
        parsed = layout.parse_adapter_target(target_path)
        if parsed is not None and parsed[0] == ids[index]:
            rel = layout.stored_target_name(target_path, info.hashes["sha256"])
            out[parsed[1]] = path / "targets" / rel
    return out


# Key rotation table (python-tuf test_updater_key_rotations style): old root (keys, threshold)
# -> new root (keys, threshold), which keys sign the new root, and whether it is trusted.
# TUF 5.3.4/5.3.5: a threshold of the OLD keys AND a threshold of the NEW keys must sign.
ROTATIONS = [
    ("same key re-signs", ("A", 1), ("A", 1), "A", True),
    ("1-of-1 to a new key, both sign", ("A", 1), ("B", 1), "AB", True),
    ("1-of-1 to a new key, only the new signs", ("A", 1), ("B", 1), "B", False),
    ("1-of-1 to a new key, only the old signs", ("A", 1), ("B", 1), "A", False),
    ("2-of-3 swap one key, two shared sign", ("ABC", 2), ("ABD", 2), "AB", True),
    ("2-of-3 to disjoint-ish, new threshold unmet", ("ABC", 2), ("CDE", 2), "ABD", False),
    ("2-of-3 to disjoint-ish, both met via C", ("ABC", 2), ("CDE", 2), "ACD", True),
    ("2-of-3 to 1-of-1, old threshold unmet", ("ABC", 2), ("D", 1), "AD", False),
    ("1-of-2 raised to 2-of-2, one signs", ("AB", 1), ("AB", 2), "A", False),
    ("1-of-2 raised to 2-of-2, both sign", ("AB", 1), ("AB", 2), "AB", True),
    ("3-of-3 with an unknown third signer", ("ABC", 3), ("ABC", 3), "ABE", False),
    ("threshold lowered 3-of-3 to 1-of-3 by all", ("ABC", 3), ("ABC", 1), "ABC", True),
]
