"""`seqr simulate groups`: one domain split across K clients that federate one group adapter.

The domain's text (a folder of data/domains) is cut into 20 contiguous runs of paragraphs:
every 10th run is held out (the domain's held-out text, never trained on), the rest are dealt
round-robin to K parts ``<domain>_part0..K-1``, one client each. Through a real Flower run
(seqr/sim/flower_local.py) the K clients form the task group ``<domain>`` (``task-groups``)
and federate one adapter over R rounds of FedAvg on B (seqr/operator/groups.py), while single-client
adapters of other domains go through the usual registry flow. Then, on this machine, the same
budget is trained without federation: each part alone (local-only adapters, R * L steps each)
and the pooled parts (the reference, R * L steps with K times the batch: the same examples and
optimizer steps as the group). Reported: held-out loss on the domain's held-out text of all of
them, the communication per round and client (B only, in bytes), the privacy spent, and SEQR
routing accuracy with the audited registry that holds the group adapter beside the
single-client ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from seqr.cli.help import RawDefaultsHelpFormatter
from seqr.core.errors import ConfigError, DataError, SeqrError
from seqr.sim.groups_report import write_report

log = logging.getLogger("seqr.simulate.groups")
SEGMENTS = 20  # contiguous pieces of the domain text; every HELDOUT_EVERY-th is held out
HELDOUT_EVERY = 10


@dataclass(frozen=True)
class GroupsEvalConfig:
    data: Path
    out: Path
    domain: str = "shakespeare"
    others: tuple[str, ...] = ("python_code", "licences")  # single-client adapters
    clients: int = 4  # K
    rounds: int = 4  # R
    local_steps: int = 10  # L
    base_model: str = "SmolLM2-135M-Instruct"
    seq_len: int = 64
    batch_size: int = 8
    eval_sequences: int = 32  # held-out chunks per domain for losses and routing
    calib_sequences: int = 128  # sequences each client calibrates its statistics on
    aggregation: str = "fedavg"
    dp: str = "none"
    dp_noise_multiplier: float = 1.0
    dp_clip: float = 0.05
    client_cpus: int = 1
    resume: bool = False  # reuse the registry (and baselines) an earlier run left in --out

    def __post_init__(self) -> None:
        for name in ("clients", "rounds", "local_steps", "seq_len", "batch_size", "client_cpus",
                     "calib_sequences"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clients < 2:
            raise ConfigError(f"a group needs >= 2 clients, got {self.clients}")
        if self.eval_sequences < 2 or not self.others:
            raise ConfigError("need eval_sequences >= 2 and at least one other domain")

    @property
    def steps(self) -> int:
        """The per-client training budget: R rounds of L local steps."""
        return self.rounds * self.local_steps


def write_group_app(dest: Path) -> Path:
    """The Flower app folder; its pyproject already declares the group keys (flower_local)."""
    from seqr.sim.flower_local import write_app

    return write_app(dest)


def split_domain(domain: Path, dest: Path, k: int) -> tuple[list[Path], Path, Path]:
    """(K part folders, pooled folder of all parts, held-out folder): see the module doc."""
    from seqr.core.textdata import read_text_folder

    text = "\n\n".join(f.text for f in read_text_folder(domain))
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < SEGMENTS:
        raise DataError(f"{domain} has {len(paragraphs)} paragraphs; splitting needs >= {SEGMENTS}")
    # Contiguous runs of (nearly) equal paragraph counts, in text order.
    cuts = [round(i * len(paragraphs) / SEGMENTS) for i in range(SEGMENTS + 1)]
    segments = [paragraphs[cuts[i] : cuts[i + 1]] for i in range(SEGMENTS)]
    heldout = [s for i, s in enumerate(segments) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [s for i, s in enumerate(segments) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    if len(train) < k:
        raise DataError(f"{domain} is too small to split into {k} parts and a held-out part")
    parts = [dest / "partitions" / f"{domain.name}_part{i}" for i in range(k)]
    pooled, held = dest / "pooled" / domain.name, dest / "heldout" / domain.name
    for folder in (*parts, pooled, held):
        folder.mkdir(parents=True, exist_ok=True)
    for i, segment in enumerate(train):
        body = "\n\n".join(segment) + "\n"
        (parts[i % k] / f"segment-{i:02d}.txt").write_text(body, encoding="utf-8")
        (pooled / f"segment-{i:02d}.txt").write_text(body, encoding="utf-8")
    for i, segment in enumerate(heldout):
        (held / f"heldout-{i:02d}.txt").write_text("\n\n".join(segment) + "\n", encoding="utf-8")
    return parts, pooled, held


def group_members(domain: str, fingerprints: dict[str, str]) -> str:
    """The task group's slots, each bound to its member's signing key (seqr.operator.groups):
    ``name@fingerprint`` for the domain's parts only; the other domains' clients keep the
    registry flow."""
    parts = sorted(n for n in fingerprints if n.startswith(f"{domain}_part"))
    return ",".join(f"{name}@{fingerprints[name]}" for name in parts)


def run_group_federation(cfg: GroupsEvalConfig, fed: Any, work: Path) -> dict[str, Any]:
    """Operator set-up (keys, registry, enrolment) and one real Flower run."""
    from seqr.core.base_model import load_base_model
    from seqr.core.key_files import load_private_key, load_public_key, write_keypair
    from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
    from seqr.operator.federation_setup import setup_federation
    from seqr.operator.registry_ops import init_registry, open_publisher
    from seqr.sim.flower_local import SIMULATION_TIMEOUT_S, flwr_run, local_superlink

    registry = cfg.out / "registry"
    if registry.exists():
        raise ConfigError(f"{registry} already exists; pass a new --out (runs never overwrite)")
    base = load_base_model(fed.base_model)
    setup = setup_federation(fed, base.model, base.sha256)
    del base
    write_keypair(work / "server-key")
    server_key = load_private_key(work / "server-key" / PRIVATE_KEY_NAME)
    parts = sorted(p for p in (work / "partitions").iterdir() if p.is_dir())
    fingerprints = {part.name: write_keypair(work / "client-keys" / part.name) for part in parts}
    root_sha = init_registry(registry, [server_key], setup=setup)
    with open_publisher(registry, [server_key], None) as publisher:
        for part in parts:
            public = load_public_key(work / "client-keys" / part.name / PUBLIC_KEY_NAME)
            publisher.enrol_client(public)
        publisher.publish()
    members = group_members(cfg.domain, fingerprints)
    run_config = {
        **setup.federation.to_run_config(),
        "registry-dir": registry.resolve(), "server-keys": (work / "server-key").resolve(),
        "data-dir": (work / "partitions").resolve(),
        "signing-key": (work / "client-keys").resolve(),
        "min-nodes": len(parts), "task-groups": f"{cfg.domain}:{members}",
        "num-group-rounds": cfg.rounds, "group-local-steps": cfg.local_steps,
        "group-aggregation": cfg.aggregation, "group-dp": cfg.dp,
        "group-dp-noise-multiplier": cfg.dp_noise_multiplier, "group-dp-clip": cfg.dp_clip,
        "train-timeout-s": float(SIMULATION_TIMEOUT_S),
        "group-timeout-s": float(SIMULATION_TIMEOUT_S),
    }  # fmt: skip
    app = write_group_app(work / "app")
    started = time.perf_counter()
    with local_superlink(work) as link:
        flwr_run(link, app, run_config,
                 {"num-supernodes": len(parts), "client-resources-num-cpus": cfg.client_cpus},
                 timeout_s=SIMULATION_TIMEOUT_S, log=work / "flwr-run.log")  # fmt: skip
    return {"registry": registry, "root_sha256": root_sha, "federation": setup.federation,
            "seconds": time.perf_counter() - started}  # fmt: skip


def resume_federation(cfg: GroupsEvalConfig, fed: Any) -> dict[str, Any]:
    """The federation of an earlier run in --out (its registry is audited again below)."""
    from seqr.core.base_model import load_base_model
    from seqr.operator.federation_setup import setup_federation
    from seqr.operator.registry_ops import root_sha256

    base = load_base_model(fed.base_model)
    setup = setup_federation(fed, base.model, base.sha256)
    registry = cfg.out / "registry"
    log.info("resuming: reusing the registry in %s", registry)
    return {"registry": registry, "root_sha256": root_sha256(registry),
            "federation": setup.federation, "seconds": 0.0}  # fmt: skip


def train_baselines(
    cfg: GroupsEvalConfig, fed: Any, parts: list[Path], pooled: Path, work: Path
) -> dict[str, Path]:
    """Local-only adapters (each part alone) and the centrally trained reference, in-process."""
    from seqr.core.key_files import write_keypair
    from seqr.core.signing import PRIVATE_KEY_NAME
    from seqr.node.task import run_client

    key = work / "baseline-key" / PRIVATE_KEY_NAME
    if not key.exists():
        write_keypair(key.parent)
    out: dict[str, Path] = {}
    jobs = [
        (
            "central",
            pooled,
            fed.replace(train_steps=cfg.steps, train_batch_size=cfg.batch_size * cfg.clients),
        )
    ]
    local = fed.replace(train_steps=cfg.steps)
    jobs += [(f"local_{i}", part, local) for i, part in enumerate(parts)]
    for name, folder, job_fed in jobs:
        target = work / "baselines" / name
        if not target.exists():
            log.info("training %s on %s (%d steps, batch %d)", name, folder.name, job_fed.steps,
                     job_fed.train_batch_size)  # fmt: skip
            run_client(folder, key, target, job_fed, name=name, progress=True)
        out[name] = target
    return out


def heldout_losses(
    fed: Any, adapters: dict[str, Path], heldout: Any, batch_size: int
) -> dict[str, float]:
    """Mean next-token loss of each adapter (and the base model) on the held-out chunks."""
    import torch

    from seqr.core.base_model import load_base_model
    from seqr.sim.eval_losses import sequence_losses
    from seqr.sim.library import load_library
    from seqr.sim.lm_loss import BASE, causal_lm_losses, merged_adapter

    base = load_base_model(fed.base_model, expected_sha256=fed.base_model_sha256)
    library = load_library(base.model, adapters)
    ids = torch.as_tensor(heldout, dtype=torch.long)
    model = library.peft_model
    out = {}
    for name in [BASE, *library.adapters]:
        with merged_adapter(model, name):
            losses = sequence_losses(lambda b: causal_lm_losses(model, b), ids, batch_size)
        out["base" if name == BASE else name] = float(losses.mean())
    return out


def run(cfg: GroupsEvalConfig) -> dict[str, Any]:
    from seqr.core.base_model import load_base_model
    from seqr.core.federation import FederationConfig
    from seqr.core.textdata import read_text_folder, tokenize_chunks
    from seqr.operator.settings import state_dir_for
    from seqr.registry.audit import AuditConfig, audit_registry
    from seqr.sim.evaluate import EvalConfig, evaluate
    from seqr.sim.library import exports_from_audit, load_library
    from seqr.sim.registry_eval import heldout_chunks

    domains = {d: cfg.data / d for d in (cfg.domain, *cfg.others)}
    missing = [d for d, p in domains.items() if not p.is_dir()]
    if missing:
        raise DataError(f"domains {missing} are not folders in {cfg.data}; run `seqr data prepare`")
    work = cfg.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    parts, pooled, held = split_domain(domains[cfg.domain], work, cfg.clients)
    for other in cfg.others:
        link = work / "partitions" / other
        if not link.exists():
            link.symlink_to(domains[other].resolve(), target_is_directory=True)
    fed = FederationConfig(base_model=cfg.base_model, train_steps=cfg.steps,
                           train_seq_len=cfg.seq_len, train_batch_size=cfg.batch_size,
                           calib_max_sequences=cfg.calib_sequences)  # fmt: skip
    if cfg.resume and (cfg.out / "registry" / "metadata" / "1.root.json").is_file():
        flower = resume_federation(cfg, fed)
    else:
        flower = run_group_federation(cfg, fed, work)
    fed = flower["federation"]
    verified = audit_registry(
        flower["registry"],
        work / "trusted_state",
        config=AuditConfig(expected_root_sha256=flower["root_sha256"]),
    )
    summary = json.loads(
        (state_dir_for(flower["registry"]) / "groups" / f"{cfg.domain}.json").read_text()
    )
    exports = exports_from_audit(verified, work / "adapters")
    if cfg.domain not in exports:
        raise SeqrError(
            f"the group adapter was not published: {summary['status']} {summary['reason']}"
        )
    baselines = train_baselines(cfg, fed, parts, pooled, work)
    base = load_base_model(fed.base_model, expected_sha256=fed.base_model_sha256)
    held_chunks = tokenize_chunks(read_text_folder(held), base.tokenizer, fed.train_seq_len)
    held_chunks = held_chunks[:: max(1, len(held_chunks) // cfg.eval_sequences)][
        : cfg.eval_sequences
    ]
    losses = heldout_losses(fed, {"group": exports[cfg.domain], **baselines}, held_chunks, 8)
    heldout = {
        cfg.domain: held_chunks,
        **heldout_chunks([domains[o] for o in cfg.others], base.tokenizer, fed),
    }
    library = load_library(base.model, exports)
    routing = evaluate(
        library, heldout, EvalConfig(max_sequences_per_domain=cfg.eval_sequences, peft_arrow=False)
    )
    return write_report(cfg, flower, verified.report, summary, losses, routing, len(held_chunks))


def main(argv: list[str] | None = None) -> int:
    d = GroupsEvalConfig(Path("data/domains"), Path("runs/groups"))
    parser = argparse.ArgumentParser(
        prog="seqr simulate groups", description=__doc__, formatter_class=RawDefaultsHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=d.data,
        help="one folder of text per domain (seqr data prepare)",
    )
    parser.add_argument("--out", type=Path, default=d.out, help="run folder to create")
    parser.add_argument(
        "--domain", default=None, help=f"the domain split across the group (default: {d.domain})"
    )
    parser.add_argument(
        "--others",
        default=None,
        help=f"comma-separated single-client domains (default: {','.join(d.others)})",
    )
    parser.add_argument(
        "--base-model", default=None, help=f"known model name or local model folder (default: "
        f"{d.base_model})"
    )  # fmt: skip
    helps = {
        "clients": "K: clients the domain is split across",
        "rounds": "R: rounds of FedAvg on B",
        "local_steps": "L: local steps per round",
        "seq_len": "tokens per training sequence",
        "batch_size": "sequences per step and client",
        "eval_sequences": "held-out chunks per domain for losses and routing",
        "calib_sequences": "sequences each client calibrates its statistics on",
    }
    quick = {"rounds": 2, "local_steps": 3, "seq_len": 48, "eval_sequences": 12}
    for name, text in helps.items():
        also = f"; --quick: {quick[name]}" if name in quick else ""
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"{text} (default: {getattr(d, name)}{also})")  # fmt: skip
    parser.add_argument("--aggregation", default=None, help="fedavg|fedtrimmedavg|fedmedian|krum "
                        f"(default: {d.aggregation})")  # fmt: skip
    parser.add_argument("--dp", default=None, help=f"none|server|client (default: {d.dp})")
    parser.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=None,
        help=f"noise multiplier of DP (default: {d.dp_noise_multiplier})",
    )
    parser.add_argument(
        "--dp-clip", type=float, default=None, help=f"clipping norm of DP (default: {d.dp_clip})"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 steps, short text")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the registry and baselines already in --out"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.resume:
        overrides["resume"] = True
    if args.quick:
        overrides.update(quick)
    for f in fields(GroupsEvalConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("data", "out"):
            overrides[f.name] = value
    if args.others is not None:
        overrides["others"] = tuple(o.strip() for o in args.others.split(",") if o.strip())
    try:
        cfg = replace(GroupsEvalConfig(args.data, args.out), **overrides)
        report = run(cfg)
    except SeqrError as exc:
        print(f"seqr simulate groups: {exc}")
        return 2
    t = report["targets"]
    print(f"\nheld-out loss: group {report['losses']['group']:.4f}, central "
          f"{report['losses']['central']:.4f} ({100 * t['group_vs_central_relative']:+.2f}%), "
          f"local-only mean {t['local_mean']:.4f}; B per round and client "
          f"{report['communication']['b_bytes']} bytes")  # fmt: skip
    print(f"wrote {cfg.out / 'report.md'}")
    return 0
