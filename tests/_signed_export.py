"""Builds real, tiny signed adapter exports for the manifest and admission tests.

One layer, q_proj and v_proj, r = 2, d = 4: peft tensor names, real safetensors bytes, real
NormStatistics, a real OpenSSF model-signing bundle made by model-signing with a real ECDSA
P-256 key file. Tests change one thing and expect one rejection.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from seqr.core import key_files, signing
from seqr.core.manifest import Manifest, sign_export
from seqr.core.stats import NormStatistics

RANK, DIM = 2, 4
ALPHA = 4.0
TARGETS = ("q_proj", "v_proj")
BASE_SHA = hashlib.sha256(b"tiny base model").hexdigest()
A_SEED = 1234
CREATED = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
STATS_MODULES = tuple(f"model.layers.0.self_attn.{m}" for m in TARGETS)


def make_key(folder: Path, passphrase: bytes | None = None) -> key_files.SigningKeyFile:
    """A new key pair in ``folder`` (as `seqr keys generate` writes it), opened for signing."""
    key_files.write_keypair(folder, passphrase)
    return key_files.SigningKeyFile.open(folder / signing.PRIVATE_KEY_NAME, passphrase)


def tensor_name(module: str, which: str) -> str:
    return f"base_model.model.model.layers.0.self_attn.{module}.lora_{which}.weight"


def shared_a() -> dict[str, np.ndarray]:
    """The federation's frozen A, one per module, from the public seed."""
    rng = np.random.default_rng(A_SEED)
    return {
        tensor_name(m, "A"): rng.standard_normal((RANK, DIM)).astype(np.float32) for m in TARGETS
    }


A_SHA = hashlib.sha256(b"".join(a.tobytes() for _, a in sorted(shared_a().items()))).hexdigest()


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = dict(shared_a())
    for m in TARGETS:
        tensors[tensor_name(m, "B")] = rng.standard_normal((DIM, RANK)).astype(np.float32)
    return tensors


def expected_tensors() -> dict[str, tuple[tuple[int, ...], str]]:
    return {name: (tuple(t.shape), "F32") for name, t in make_tensors().items()}


def make_stats(mean: float = 5.0, std: float = 1.0, count: int = 64) -> NormStatistics:
    """Statistics with an exact mean and std per module (symmetric two-point sample)."""
    stats = NormStatistics()
    half = count // 2
    values = np.array([mean - std] * half + [mean + std] * half)
    for module in STATS_MODULES:
        stats.update(module, values)
    return stats


def make_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": list(reversed(TARGETS)),  # peft writes them in set order
        "lora_dropout": 0.0,
    }
    config.update(overrides)
    return config


def write_payload(
    folder: Path,
    *,
    tensors: Mapping[str, np.ndarray] | None = None,
    weights: bytes | None = None,
    stats: bytes | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = save(dict(tensors if tensors is not None else make_tensors()))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "norm_stats.json").write_bytes(
        stats if stats is not None else make_stats().to_json_bytes()
    )
    (folder / "adapter_config.json").write_text(
        json.dumps(config if config is not None else make_config())
    )


def make_export(
    folder: Path,
    key: key_files.SigningKeyFile,
    *,
    tensors: Mapping[str, np.ndarray] | None = None,
    weights: bytes | None = None,
    stats: bytes | None = None,
    config: Mapping[str, Any] | None = None,
    sign_only: bool = False,
    **manifest: Any,
) -> Manifest:
    """Write a complete signed export; ``manifest`` overrides sign_export's keyword arguments.

    ``sign_only`` signs whatever the folder holds now instead of writing the payload first.
    """
    if not sign_only:
        write_payload(folder, tensors=tensors, weights=weights, stats=stats, config=config)
    kwargs: dict[str, Any] = {
        "name": "python-stdlib",
        "base_model_sha256": BASE_SHA,
        "a_seed": A_SEED,
        "a_sha256": A_SHA,
        "rank": RANK,
        "alpha": ALPHA,
        "target_modules": list(TARGETS),
        "example_count": 100,
        "created": CREATED,
    }
    kwargs.update(manifest)
    return sign_export(folder, key, **kwargs)
