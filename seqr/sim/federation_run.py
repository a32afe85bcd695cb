"""The federation part of `seqr simulate`: operator set-up, then one real Flower run.

The operator makes the server key and the registry (pinned to the base model and the shared A),
and enrols each client's public key; each simulated client gets its own signing key and one
domain folder (partition-id picks the partition-id-th subfolder, seqr/node/client_app.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from seqr.core.atomic_write import write_atomic
from seqr.core.errors import ConfigError
from seqr.core.key_files import load_private_key, load_public_key, write_keypair
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME


@dataclass(frozen=True)
class FederationResult:
    registry: Path
    root_sha256: str  # what clients pin when they first audit the registry
    federation: Any  # the FederationConfig with the model and A hashes filled in
    work: Path
    peak_rss_by_process: dict[str, int]  # bytes, by command name (Ray client actors: ray::...)
    peak_rss_total: int  # bytes, everything the SuperLink started
    seconds: float = 0.0

    def save(self) -> None:
        """work/federation.json, so the evaluation can be rerun alone (--evaluate-only)."""
        data = {**asdict(self), "registry": str(self.registry), "work": str(self.work),
                "federation": self.federation.to_run_config()}  # fmt: skip
        write_atomic(self.work / "federation.json", json.dumps(data, indent=2).encode())

    @staticmethod
    def finished(work: Path) -> bool:
        """Whether a federation ran to its end in ``work`` (save() is its last step)."""
        return (work / "federation.json").is_file()

    @classmethod
    def load(cls, work: Path) -> FederationResult:
        from seqr.core.federation import FederationConfig
        from seqr.core.strict_json import loads_strict

        path = work / "federation.json"
        if not cls.finished(work):
            raise ConfigError(
                f"{path} is missing: run the federation first (without --evaluate-only)"
            )
        # A run folder may have been copied from elsewhere: the one strict parser, bounded.
        data = loads_strict(path.read_bytes(), what=str(path), max_bytes=1 << 20)
        data["federation"] = FederationConfig.from_run_config(data["federation"])
        # The run folder may have moved or been copied: its registry and work folder are the
        # ones beside this file, not the paths recorded when it was written.
        return cls(**{**data, "registry": work.parent / "registry", "work": work})


def _partitions(work: Path, domains: list[Path]) -> Path:
    """A folder of links, one per domain: each simulated client takes one (by partition-id)
    and names its adapter after it."""
    parts = work / "partitions"
    parts.mkdir(parents=True, exist_ok=True)
    for domain in domains:
        link = parts / domain.name
        if not link.exists():
            link.symlink_to(domain.resolve(), target_is_directory=True)
    return parts


def run_federation(
    cfg: Any, fed: Any, domains: list[Path], progress_dir: Path | None = None
) -> FederationResult:
    """Set up the operator's side, then one Flower run; nodes write progress files into
    ``progress_dir`` (seqr/node/progress.py) when it is given."""
    from seqr.core.base_model import load_base_model
    from seqr.operator.federation_setup import setup_federation
    from seqr.operator.registry_ops import init_registry, open_publisher
    from seqr.sim.flower_local import (
        SIMULATION_TIMEOUT_S,
        MemorySampler,
        flwr_run,
        local_superlink,
        write_app,
    )

    started = time.perf_counter()
    registry, work = cfg.out / "registry", cfg.out / "work"
    if registry.exists():
        raise ConfigError(f"{registry} already exists; pass a new --out (runs never overwrite)")
    work.mkdir(parents=True, exist_ok=True)
    base = load_base_model(fed.base_model)
    setup = setup_federation(fed, base.model, base.sha256)
    del base
    server_key_dir = work / "server-key"
    if not (server_key_dir / PRIVATE_KEY_NAME).exists():
        write_keypair(server_key_dir)
    server_key = load_private_key(server_key_dir / PRIVATE_KEY_NAME)
    keys = work / "client-keys"
    parts = _partitions(work, domains)
    for part in sorted(parts.iterdir()):
        if not (keys / part.name / PRIVATE_KEY_NAME).exists():
            write_keypair(keys / part.name)
    root_sha = init_registry(registry, [server_key], setup=setup)
    with open_publisher(registry, [server_key], None) as publisher:
        for part in sorted(parts.iterdir()):
            publisher.enrol_client(load_public_key(keys / part.name / PUBLIC_KEY_NAME))
        publisher.publish()
    run_config = {
        **setup.federation.to_run_config(),
        "registry-dir": registry.resolve(),
        "server-keys": server_key_dir.resolve(),
        "data-dir": parts.resolve(),
        "signing-key": keys.resolve(),
        "min-nodes": len(domains),
        "train-timeout-s": float(SIMULATION_TIMEOUT_S),
    }
    if progress_dir is not None:
        progress_dir.mkdir(parents=True, exist_ok=True)
        run_config["progress-dir"] = progress_dir.resolve()
    federation_config = {
        "num-supernodes": len(domains),
        "client-resources-num-cpus": cfg.client_cpus,
    }
    app = write_app(work / "app")
    with local_superlink(work) as link, MemorySampler(link.process.pid) as memory:
        flwr_run(link, app, run_config, federation_config, timeout_s=SIMULATION_TIMEOUT_S,
                 log=work / "flwr-run.log")  # fmt: skip
    result = FederationResult(registry, root_sha, setup.federation, work,
                              memory.peak_by_name, memory.peak_total,
                              time.perf_counter() - started)  # fmt: skip
    result.save()
    return result
