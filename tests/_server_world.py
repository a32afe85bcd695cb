"""A tiny but real federation for the server tests: tiny Llama, real client runs, real keys.

Honest exports come from the client's own pipeline (seqr.node.task.run_client: LoRA-FA training,
calibration, signed export); lying ones re-sign an honest export with falsified statistics.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tiny import copy_texts, tiny_model_dir

from seqr.core import key_files, signing
from seqr.core.base_model import BaseModel, load_base_model
from seqr.core.federation import FederationConfig
from seqr.core.manifest import NORM_STATS_NAME, parse_manifest, read_export, sign_export
from seqr.core.stats import NormStatistics, RunningMoments
from seqr.operator.federation_setup import FederationSetup, setup_federation
from seqr.operator.probe import Probe, load_probe_texts

# Client data: disjoint stdlib files per client (tests/tiny.py STDLIB_FILES and a few more).
CLIENT_FILES = (
    ("bisect.py", "heapq.py"),
    ("textwrap.py", "string.py"),
    ("colorsys.py", "keyword.py"),
    ("glob.py", "fnmatch.py"),
)


def tiny_federation(**changes: Any) -> FederationConfig:
    fields: dict[str, Any] = {
        "base_model": str(tiny_model_dir()),
        "lora_rank": 4,
        "lora_alpha": 8,
        "train_steps": 4,
        "train_batch_size": 4,
        "train_seq_len": 32,
        "calib_max_sequences": 8,
    }
    fields.update(changes)
    return FederationConfig(**fields)


@functools.cache
def base_model() -> BaseModel:
    return load_base_model(str(tiny_model_dir()))


@functools.cache
def federation_setup() -> FederationSetup:
    base = base_model()
    return setup_federation(tiny_federation(), base.model, base.sha256)


@functools.cache
def probe() -> Probe:
    base = base_model()
    return Probe.build(
        base.model, base.tokenizer, load_probe_texts(""), federation_setup(), max_tokens=1024
    )


@dataclass(frozen=True)
class Client:
    key_dir: Path
    export_dir: Path

    @property
    def key(self) -> Any:
        return key_files.load_private_key(self.key_dir / signing.PRIVATE_KEY_NAME)

    @property
    def public_hex(self) -> str:
        return signing.public_key_bytes(self.key).hex()

    @property
    def public(self) -> bytes:
        return signing.public_key_bytes(self.key)

    def files(self) -> dict[str, bytes]:
        return read_export(self.export_dir)


def make_client(root: Path, index: int, *, files: tuple[str, ...] | None = None) -> Client:
    """Train, calibrate, export and sign one client's adapter with the real client code."""
    from seqr.node.task import run_client

    key_dir = root / f"client{index}-key"
    key_files.write_keypair(key_dir)
    data = copy_texts(root / f"client{index}-data", files or CLIENT_FILES[index])
    out = root / f"client{index}-export"
    run_client(
        data, key_dir / signing.PRIVATE_KEY_NAME, out, federation_setup().federation,
        name=f"client-{index}", progress=False,
    )  # fmt: skip
    return Client(key_dir, out)


def resign(
    client: Client,
    dest: Path,
    *,
    stats: NormStatistics | None = None,
    later: timedelta = timedelta(seconds=1),
) -> dict[str, bytes]:
    """A copy of the client's export, optionally with other statistics, signed again by the
    same key with a later ``created`` (so only the change under test can make it fail)."""
    shutil.copytree(client.export_dir, dest)
    manifest = parse_manifest((dest / "manifest.json").read_bytes())
    if stats is not None:
        (dest / NORM_STATS_NAME).write_bytes(stats.to_json_bytes())
    sign_export(
        dest,
        key_files.SigningKeyFile.open(client.key_dir / signing.PRIVATE_KEY_NAME),
        name=manifest.name,
        base_model_sha256=manifest.base_model_sha256,
        a_seed=manifest.a_seed,
        a_sha256=manifest.a_sha256,
        rank=manifest.rank,
        alpha=manifest.alpha,
        target_modules=manifest.target_modules,
        example_count=manifest.example_count,
        created=manifest.created + later,
    )
    return read_export(dest)


def lying_stats(honest: NormStatistics, mean_factor: float, std_factor: float) -> NormStatistics:
    """The routing-hijack lie: every module's mean and std scaled down."""
    out = NormStatistics(score=honest.score)
    for name, m in honest.modules.items():
        std = m.std * std_factor
        out.modules[name] = RunningMoments(
            1, count=m.count, mean=m.mean * mean_factor, m2=std * std * m.count
        )
    return out


def now() -> datetime:
    return datetime.now(UTC)
