"""Builds real signed client exports and registries fast, and mounts attacks on them.

Exports are built in memory (tiny safetensors: one layer, q_proj and v_proj, r = 2, d = 4;
real NormStatistics; a real OpenSSF model-signing bundle made by model-signing with the
client's ECDSA P-256 key). ``forge_version`` plays a malicious
or buggy server (python-tuf RepositorySimulator style): it takes the newest version's
payload, lets a test change it, signs it with whatever keys it is given and commits it
like the publisher would (metadata, a correct RFC 9162 tree head, latest.json), so that
only the check under test can catch the change.
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

from seqr.core import signing
from seqr.core.manifest import Manifest
from seqr.core.model_signature import sign_files
from seqr.core.stats import NormStatistics
from seqr.registry import merkle, store
from seqr.registry.codec import dumps, format_time
from seqr.registry.config import PublisherConfig
from seqr.registry.envelope import REGISTRY_TYPE, TREE_HEAD_TYPE, parse_envelope, sign_envelope
from seqr.registry.metadata import EXPORT_FILES, FederationPin, pointer_bytes
from seqr.registry.publish import Publisher
from seqr.registry.tree_head import TreeHead

T0 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
RANK, DIM = 2, 4
TARGETS = ("q_proj", "v_proj")
BASE_SHA = hashlib.sha256(b"tiny base model").hexdigest()
A_SEED = 1234
MODULES = tuple(f"model.layers.0.self_attn.{m}" for m in TARGETS)


def tensor_name(module: str, which: str) -> str:
    return f"base_model.model.model.layers.0.self_attn.{module}.lora_{which}.weight"


def shared_a() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(A_SEED)
    return {
        tensor_name(m, "A"): rng.standard_normal((RANK, DIM)).astype(np.float32) for m in TARGETS
    }


A_SHA = hashlib.sha256(b"".join(a.tobytes() for _, a in sorted(shared_a().items()))).hexdigest()
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


def key_file(key: EllipticCurvePrivateKey) -> signing.SigningKeyFile:
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
    return signing.SigningKeyFile.open(path)


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


def read_payload(path: Path, version: int) -> dict[str, Any]:
    data = (path / store.metadata_path(version)).read_bytes()
    return json.loads(parse_envelope(data, REGISTRY_TYPE, "test").payload)


def latest_version(path: Path) -> int:
    return int(json.loads((path / store.POINTER).read_bytes())["version"])


def forge_version(
    path: Path,
    keys: Sequence[EllipticCurvePrivateKey],
    mutate: Callable[[dict[str, Any]], None] | None = None,
    *,
    now: datetime = T0 + timedelta(hours=1),
    payload_bytes: Callable[[dict[str, Any]], bytes] | None = None,
    head_keys: Sequence[EllipticCurvePrivateKey] | None = None,
) -> int:
    """Commit version N+1 = newest payload changed by ``mutate``, signed by ``keys``."""
    n = latest_version(path)
    prev = (path / store.metadata_path(n)).read_bytes()
    payload = read_payload(path, n)
    payload.update(
        version=n + 1,
        previous={"version": n, "sha256": hashlib.sha256(prev).hexdigest()},
        issued=format_time(now),
        expires=format_time(now + timedelta(days=7)),
    )
    if mutate is not None:
        mutate(payload)
    body = payload_bytes(payload) if payload_bytes is not None else dumps(payload)
    data = sign_envelope(REGISTRY_TYPE, body, keys)
    (path / store.metadata_path(n + 1)).write_bytes(data)
    write_tree_head(path, n + 1, head_keys or keys, payload["root_version"], now)
    (path / store.POINTER).write_bytes(pointer_bytes(n + 1))
    return n + 1


def write_tree_head(
    path: Path, size: int, keys: Sequence[EllipticCurvePrivateKey], root_version: int, now: datetime
) -> None:
    """A correct, signed RFC 9162 head over metadata/1..size as they are on disk now."""
    leaves = [
        merkle.leaf_hash((path / store.metadata_path(v)).read_bytes()) for v in range(1, size + 1)
    ]
    head = TreeHead(
        tree_size=size,
        root_hash=merkle.root_hash(leaves),
        timestamp=now,
        root_version=root_version,
        inclusion=tuple(merkle.inclusion_proof(leaves, size - 1)),
        consistency=tuple(merkle.consistency_proof(leaves, size - 1)) if size > 1 else (),
    )
    data = sign_envelope(TREE_HEAD_TYPE, head.to_payload(), keys)
    (path / store.tree_head_path(size)).write_bytes(data)


def entry_json(files: Mapping[str, bytes], client: EllipticCurvePrivateKey) -> dict[str, Any]:
    """The registry entry a (malicious) server would write for these files."""
    public = signing.public_key_bytes(client)
    return {
        "adapter_sha256": hashlib.sha256(files["adapter_model.safetensors"]).hexdigest(),
        "client": signing.fingerprint(public),
        "client_key": public.hex(),
        "admitted": format_time(T0),
        "files": {
            n: {"sha256": hashlib.sha256(files[n]).hexdigest(), "length": len(files[n])}
            for n in EXPORT_FILES
        },
    }


def inject_adapter(
    path: Path,
    server_keys: Sequence[EllipticCurvePrivateKey],
    client: EllipticCurvePrivateKey,
    files: Mapping[str, bytes],
) -> int:
    """A server that skips its own checks: store ``files`` and list them in a new version."""
    entry = entry_json(files, client)
    folder = path / "adapters" / entry["adapter_sha256"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return forge_version(path, server_keys, lambda p: p["entries"].append(entry))


def adapter_dir(path: Path, index: int = 0) -> Path:
    """The folder of the ``index``-th entry of the newest version."""
    entry = read_payload(path, latest_version(path))["entries"][index]
    return path / "adapters" / entry["adapter_sha256"]


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
    ("2-of-3 to 1-of-1, duplicate signature counts once", ("ABC", 2), ("D", 1), "AAD", False),
    ("1-of-2 raised to 2-of-2, one signs", ("AB", 1), ("AB", 2), "A", False),
    ("1-of-2 raised to 2-of-2, both sign", ("AB", 1), ("AB", 2), "AB", True),
    ("3-of-3 with an unknown third signer", ("ABC", 3), ("ABC", 3), "ABE", False),
    ("threshold lowered 3-of-3 to 1-of-3 by all", ("ABC", 3), ("ABC", 1), "ABC", True),
]


def duplicate_first_signature(envelope: bytes) -> bytes:
    """An envelope whose first signature appears twice (one key "signing twice")."""
    obj = json.loads(envelope)
    obj["signatures"].append(dict(obj["signatures"][0]))
    return json.dumps(obj).encode()
