"""`seqr bench audit`: time ``audit_registry`` on a 1,000-adapter registry of real-shaped adapters.

The registry is built the way a server builds it (Publisher: signed client exports staged and
published in rounds of ``per_version`` adapters) with the real shapes of SmolLM2-135M LoRA
adapters by default: r = 8 on q_proj (576 -> 576) and v_proj (576 -> 192) in all 30 layers,
float32, one shared frozen A (FFA-LoRA), ~1.8 MB per adapter. Then a client-side audit is
timed from nothing (first use: every version, signature, log proof and adapter byte) and
again with a trusted state (what a client that audited before does). Target: first-use audit
of 1,000 adapters in at most 10 s on 2 cores. Timings go to stdout and ``audit.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save
from tqdm import tqdm

from seqr.cli.help import DefaultsHelpFormatter
from seqr.core import key_files, signing
from seqr.core.errors import ConfigError
from seqr.core.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from seqr.core.model_signature import sign_files
from seqr.core.shared_a import generate_shared_a, shared_a_sha256
from seqr.core.stats import NormStatistics
from seqr.registry import audit_registry
from seqr.registry.config import AuditConfig, PublisherConfig
from seqr.registry.metadata import FederationPin
from seqr.registry.publish import Publisher

TARGET_SECONDS = 10.0  # first-use audit of 1,000 adapters on 2 cores (issue 4)
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@dataclass(frozen=True)
class AuditBenchConfig:
    adapters: int = 1000
    per_version: int = 50  # adapters published per registry version (a Flower round)
    layers: int = 30  # SmolLM2-135M
    rank: int = 8
    d_model: int = 576  # q_proj in/out, v_proj in
    d_kv: int = 192  # v_proj out: 3 kv heads x 64
    workers: int = 2
    repeats: int = 3
    seed: int = 0
    out: Path = field(default_factory=lambda: Path("runs/bench_audit"))
    keep: bool = False  # keep the registry (~1.8 GB at the defaults) for the next run

    def __post_init__(self) -> None:
        for name in ("adapters", "per_version", "layers", "rank", "d_model", "d_kv"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"AuditBenchConfig.{name} = {getattr(self, name)} must be >= 1")
        for name in ("workers", "repeats"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"AuditBenchConfig.{name} = {getattr(self, name)} must be >= 1")

    @property
    def adapter_bytes(self) -> int:
        r, d, kv = self.rank, self.d_model, self.d_kv
        return 4 * self.layers * (r * d + d * r + r * d + kv * r)


def _modules(cfg: AuditBenchConfig) -> list[tuple[str, int]]:
    return [
        (f"model.layers.{i}.self_attn.{m}", d_out)
        for i in range(cfg.layers)
        for m, d_out in (("q_proj", cfg.d_model), ("v_proj", cfg.d_kv))
    ]


def _shared_a(cfg: AuditBenchConfig) -> dict[str, np.ndarray]:
    """The federation's shared A of every module (what every audit checks)."""
    return {
        f"base_model.model.{module}.lora_A.weight": generate_shared_a(
            cfg.seed, module, cfg.rank, cfg.d_model
        ).numpy()
        for module, _ in _modules(cfg)
    }


def _export(
    cfg: AuditBenchConfig,
    key: key_files.SigningKeyFile,
    index: int,
    shared: dict[str, np.ndarray],
    pin: FederationPin,
) -> dict[str, bytes]:
    """One client's signed export, as seqr client export writes it (name -> bytes)."""
    rng = np.random.default_rng(cfg.seed + 1 + index)
    tensors = dict(shared)
    stats = NormStatistics()
    for module, d_out in _modules(cfg):
        b = rng.standard_normal((d_out, cfg.rank), dtype=np.float32) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        stats.update(module, np.abs(rng.standard_normal(64)) + 1.0)
    payload = {
        "adapter_config.json": json.dumps(
            {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": 2 * cfg.rank}
        ).encode(),
        "adapter_model.safetensors": save(tensors),
        "norm_stats.json": stats.to_json_bytes(),
    }
    manifest = Manifest(
        base_model_sha256=pin.base_model_sha256,
        a_seed=pin.a_seed,
        a_sha256=pin.a_sha256,
        rank=cfg.rank,
        alpha=float(2 * cfg.rank),
        target_modules=pin.target_modules,
        public_key=key.public.hex(),
        created=T0,
        name=f"domain-{index:04d}",
        example_count=1000,
    ).to_bytes()
    signed = {**payload, MANIFEST_NAME: manifest}
    return {**signed, SIGNATURE_NAME: sign_files(signed, key, name=f"domain-{index:04d}")}


def build_registry(cfg: AuditBenchConfig, path: Path) -> dict[str, Any]:
    """Publish ``cfg.adapters`` adapters in rounds; returns build facts."""
    started = time.perf_counter()
    shared = _shared_a(cfg)
    a_sha = shared_a_sha256(cfg.seed, {m: cfg.d_model for m, _ in _modules(cfg)}, cfg.rank)
    pin = FederationPin(
        hashlib.sha256(b"SmolLM2-135M").hexdigest(), a_sha, cfg.seed, cfg.rank, ("q_proj", "v_proj")
    )
    server = signing.generate_private_key()
    config = PublisherConfig(federation=pin, auto_enrol=True)
    # Client keys live in files because model-signing signs from a key file; none is kept.
    keys = Path(tempfile.mkdtemp(prefix="seqr-bench-keys-"))
    with Publisher.create(path, [server], config=config, now=T0) as pub:
        for i in tqdm(range(cfg.adapters), desc="build registry", unit="adapter"):
            key_files.write_keypair(keys / f"{i:05d}")  # one client per adapter
            client = key_files.SigningKeyFile.open(keys / f"{i:05d}" / signing.PRIVATE_KEY_NAME)
            pub.stage_adapter(_export(cfg, client, i, shared, pin), admitted=T0)
            if (i + 1) % cfg.per_version == 0 or i + 1 == cfg.adapters:
                pub.publish(now=T0 + timedelta(seconds=i + 1))
        version = pub.version
    shutil.rmtree(keys, ignore_errors=True)
    return {"build_seconds": time.perf_counter() - started, "versions": version}


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(cfg: AuditBenchConfig) -> dict[str, Any]:
    registry, params = cfg.out / "registry", cfg.out / "params.json"
    wanted = {
        k: v for k, v in asdict(cfg).items() if k not in ("out", "keep", "workers", "repeats")
    }
    built: dict[str, Any] = {}
    if not (registry.exists() and params.exists() and json.loads(params.read_text()) == wanted):
        shutil.rmtree(registry, ignore_errors=True)
        cfg.out.mkdir(parents=True, exist_ok=True)
        built = build_registry(cfg, registry)
        params.write_text(json.dumps(wanted))
    audit_cfg = AuditConfig(workers=cfg.workers)
    cold, warm = [], []
    state = cfg.out / "trusted_state"
    shutil.rmtree(state, ignore_errors=True)
    for _ in range(cfg.repeats):
        report = audit_registry(registry, None, config=audit_cfg).report
        cold.append(report.seconds)
        warm.append(audit_registry(registry, state, config=audit_cfg).report.seconds)
    size = _disk_bytes(registry)
    best = min(cold)
    result = {
        "config": {**wanted, "workers": cfg.workers, "repeats": cfg.repeats},
        "adapter_bytes": cfg.adapter_bytes,
        "registry_bytes": size,
        "entries": len(report.entries),
        "versions": report.version,
        "first_use_audit_seconds": cold,
        "trusted_state_audit_seconds": warm,
        "best_first_use_seconds": best,
        "per_adapter_ms": 1000 * best / max(1, len(report.entries)),
        "throughput_mb_per_s": size / best / 1e6,
        "target_seconds": TARGET_SECONDS,
        "target_ratio": best / TARGET_SECONDS,
        "load_average_1_5_15min": list(os.getloadavg()),  # a shared machine: context for times
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "machine": platform.platform(),
        "python": sys.version.split()[0],
        **built,
    }
    (cfg.out / "audit.json").write_text(json.dumps(result, indent=2))
    if not cfg.keep:
        shutil.rmtree(registry, ignore_errors=True)
        params.unlink(missing_ok=True)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr bench audit", description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    defaults = AuditBenchConfig()
    helps = {
        "adapters": "adapters in the registry",
        "per_version": "adapters published per registry version (a Flower round)",
        "layers": "LoRA layers per adapter",
        "rank": "LoRA rank",
        "d_model": "hidden size (q_proj in and out, v_proj in)",
        "d_kv": "v_proj output size",
        "workers": "threads checking adapters",
        "repeats": "timed audits",
        "seed": "random seed of the synthetic adapters",
    }
    for name, text in helps.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, name), help=text)
    parser.add_argument("--out", type=Path, default=defaults.out, help="folder for the results")
    parser.add_argument("--keep", action="store_true", help="keep the registry for reruns")
    args = parser.parse_args(argv)
    try:
        cfg = AuditBenchConfig(**{k: v for k, v in vars(args).items()})
    except ConfigError as exc:
        parser.error(str(exc))
    result = run(cfg)
    print(
        f"audit of {result['entries']} adapters ({result['adapter_bytes'] / 1e6:.2f} MB each, "
        f"{result['versions']} versions, {result['registry_bytes'] / 1e9:.2f} GB) "
        f"with {cfg.workers} worker(s) on {result['cpus']} CPU(s), load average "
        f"{result['load_average_1_5_15min'][0]:.1f}:"
    )
    print(
        f"  first use  best {result['best_first_use_seconds']:.2f} s  "
        f"(runs {', '.join(f'{s:.2f}' for s in result['first_use_audit_seconds'])}; "
        f"{result['per_adapter_ms']:.1f} ms/adapter, {result['throughput_mb_per_s']:.0f} MB/s)"
    )
    print(f"  with a trusted state  {min(result['trusted_state_audit_seconds']):.2f} s")
    print(
        f"  target {TARGET_SECONDS:.0f} s: ratio {result['target_ratio']:.2f} "
        f"({'met' if result['target_ratio'] <= 1 else 'NOT met'})"
    )
    print(f"wrote {cfg.out / 'audit.json'}")
    return 0
