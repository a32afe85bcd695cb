"""Signed export of a trained adapter: exactly the five files the server admits.

``adapter_config.json`` + ``adapter_model.safetensors`` (peft ``save_pretrained``, loadable by
``PeftModel.from_pretrained``), ``norm_stats.json`` (NormStatistics.to_json_bytes),
``manifest.json`` and ``model.sig``, the OpenSSF model-signing bundle over the other four made
with the client's key (seqr.core.manifest.sign_export); ``model_signing verify key`` checks it
with the client's ``signing_key.pub``. The exported
lora_A tensors ARE the shared A (peft needs them to load); the server checks them against the
regenerated A, and so does this module before signing.

The folder is built next to the target and published by one rename after it verifies, so the
target either holds a complete, verified export or does not exist. No pickle anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from seqr.core.base_model import KNOWN_GGUF, atomic_folder
from seqr.core.errors import ConfigError, ShapeError
from seqr.core.export_folder import read_export
from seqr.core.federation import FederationConfig
from seqr.core.key_files import SigningKeyFile
from seqr.core.manifest import (
    EXPORT_PAYLOAD_NAMES,
    NORM_STATS_NAME,
    Manifest,
    sign_export,
    verify_export_files,
)
from seqr.core.shared_a import check_shared_a
from seqr.core.stats import NormStatistics
from seqr.node.train import ADAPTER

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # manifest.py's rule for `name`


def check_adapter_name(name: str) -> str:
    """Refuse a name the manifest would refuse, before any work is done."""
    if not _NAME.match(name):
        raise ConfigError(
            f"adapter name {name!r} must be 1-128 characters of A-Z a-z 0-9 . _ - "
            "and start with a letter or digit"
        )
    return name


def default_name(data_dir: Path) -> str:
    """A manifest-safe label from the data folder's name (``my data`` -> ``my-data``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data_dir).resolve().name).strip("-._")
    return (cleaned or "adapter")[:128]


def public_model_id(fed: FederationConfig) -> str:
    """What adapter_config.json names as base model: never a local path of this client."""
    return fed.base_model if fed.base_model in KNOWN_GGUF else Path(fed.base_model).name


def export_adapter(
    peft_model: Any,
    stats: NormStatistics,
    out_dir: str | Path,
    key: SigningKeyFile,
    *,
    fed: FederationConfig,
    a_sha256: str,
    base_model_sha256: str,
    name: str,
    example_count: int,
) -> Manifest:
    """Write and sign the export folder atomically; return its manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"export folder {out_dir} already exists; choose another or delete it")
    check_adapter_name(name)
    bad = check_shared_a(peft_model, ADAPTER, fed.a_seed)
    if bad:
        raise ShapeError(f"lora_A of {bad[:3]} differs from the shared A of seed {fed.a_seed}")
    config = peft_model.peft_config[ADAPTER]
    local_path = config.base_model_name_or_path
    try:
        with atomic_folder(out_dir) as tmp:
            config.base_model_name_or_path = public_model_id(fed)
            # save_embedding_layers=False: "auto" would look the model id up on the Hub.
            peft_model.save_pretrained(
                tmp,
                selected_adapters=[ADAPTER],
                safe_serialization=True,
                save_embedding_layers=False,
            )
            for extra in tmp.iterdir():  # peft also writes a README.md model card
                if extra.name not in EXPORT_PAYLOAD_NAMES:
                    extra.unlink()
            (tmp / NORM_STATS_NAME).write_bytes(stats.to_json_bytes())
            manifest = sign_export(
                tmp,
                key,
                name=name,
                base_model_sha256=base_model_sha256,
                a_seed=fed.a_seed,
                a_sha256=a_sha256,
                rank=fed.lora_rank,
                alpha=float(fed.lora_alpha),
                target_modules=fed.lora_target_modules,
                example_count=example_count,
            )
            verify_export_files(read_export(tmp))  # verify before publishing
    except FileExistsError:
        raise ConfigError(f"export folder {out_dir} appeared meanwhile; not replaced") from None
    finally:
        config.base_model_name_or_path = local_path
    return manifest
