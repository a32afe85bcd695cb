"""`seqr simulate`: the whole federation on this machine, then the client-side evaluation.

K clients each hold one private text domain. Through a real Flower run (our own SuperLink in
simulation mode, `flwr run` of the seqr app) each trains, calibrates, signs and submits; the
server admits and publishes the signed registry. Then, as every client does, the registry is
downloaded (here: read), audited, and its adapters are routed with SEQR on held-out text of
every domain, against the baselines (seqr/sim/evaluate.py). Output: the registry and a
report (report.md, report.json, PNG plots) in --out.
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from seqr.core.errors import ConfigError, DataError, SeqrError

# Ten well-separated domains of `seqr data prepare` (code, manuals, dictionary, law, drama,
# poetry, jokes in three languages); any folder of domain subfolders works with --domains.
DEFAULT_DOMAINS = (
    "python_code", "man_pages", "foldoc_computing", "licences", "shakespeare",
    "fortunes_en", "fortunes_de", "fortunes_es", "gcide_zoology", "python_docs",
)  # fmt: skip
log = logging.getLogger("seqr.simulate")


@dataclass(frozen=True)
class SimulateConfig:
    data: Path
    out: Path
    domains: tuple[str, ...] = ()  # () = DEFAULT_DOMAINS that exist, else every subfolder
    base_model: str = "SmolLM2-135M-Instruct"
    # 50 steps x 8 x 128 tokens per client: the 10-domain run fits 60 minutes on 2 cores
    # (~210 training tokens/s per core for SmolLM2 on CPU).
    train_steps: int = 50
    train_seq_len: int = 128
    train_batch_size: int = 8
    eval_sequences_per_domain: int = 48  # held-out chunks per domain: half validation, half test
    client_cpus: int = 1  # Ray resources per simulated client (2 clients at once on 2 cores)
    timing_ns: tuple[int, ...] = (4, 16, 64, 256, 1024)
    quick: bool = False
    evaluate_only: bool = False  # reuse the registry of an earlier run in --out

    def __post_init__(self) -> None:
        for name in ("train_steps", "train_seq_len", "train_batch_size", "client_cpus"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_sequences_per_domain < 2:
            raise ConfigError("eval_sequences_per_domain must be >= 2 (validation + test)")

    @classmethod
    def quick_defaults(cls, data: Path, out: Path, **kw: Any) -> SimulateConfig:
        """--quick: the whole path in minutes (4 domains, few steps, short sequences)."""
        base = {"train_steps": 12, "train_seq_len": 48, "eval_sequences_per_domain": 12,
                "timing_ns": (4, 16, 64), "quick": True}  # fmt: skip
        return cls(data=data, out=out, **{**base, **kw})


def pick_domains(cfg: SimulateConfig) -> list[Path]:
    if not cfg.data.is_dir():
        raise DataError(
            f"data folder {cfg.data} does not exist; run `seqr data prepare --out {cfg.data}` "
            "or pass --data with one subfolder of text files per domain"
        )
    present = {p.name: p for p in cfg.data.iterdir() if p.is_dir() and not p.name.startswith(".")}
    wanted = list(cfg.domains) or [d for d in DEFAULT_DOMAINS if d in present] or sorted(present)
    if cfg.quick and not cfg.domains:
        wanted = wanted[:4]
    missing = [d for d in wanted if d not in present]
    if missing:
        raise DataError(f"domains {missing} are not folders in {cfg.data}; have {sorted(present)}")
    if len(wanted) < 2:
        raise DataError(f"routing needs at least 2 domains; {cfg.data} gives {wanted}")
    return [present[d] for d in wanted]


def federation_for(cfg: SimulateConfig) -> Any:
    from seqr.core.federation import FederationConfig

    return FederationConfig(
        base_model=cfg.base_model,
        train_steps=cfg.train_steps,
        train_seq_len=cfg.train_seq_len,
        train_batch_size=cfg.train_batch_size,
        calib_max_sequences=64 if cfg.quick else 128,
        train_heldout_fraction=0.1,
    )


def run(cfg: SimulateConfig) -> dict[str, Any]:
    from seqr.sim.federation_run import FederationResult, run_federation
    from seqr.sim.registry_eval import evaluate_registry
    from seqr.sim.report import write_report

    domains = pick_domains(cfg)
    if cfg.evaluate_only:
        federation = FederationResult.load(cfg.out / "work")
    else:
        cfg.out.mkdir(parents=True, exist_ok=True)
        federation = run_federation(cfg, federation_for(cfg), domains)
    trained = time.perf_counter()
    report = evaluate_registry(cfg, federation, domains)
    report["run"] = {
        "clients": len(domains),
        "base_model": cfg.base_model,
        "train_steps": cfg.train_steps,
        "train_seq_len": cfg.train_seq_len,
        "federation_seconds": round(federation.seconds, 1),
        "evaluation_seconds": round(time.perf_counter() - trained, 1),
        "wall_seconds": round(federation.seconds + time.perf_counter() - trained, 1),
        "peak_rss_mib_evaluation": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_rss_mib_per_client": max(
            (v for k, v in federation.peak_rss_by_process.items() if k.startswith("ray::Client")),
            default=0,
        )
        // 2**20,
        "peak_rss_mib_federation_total": federation.peak_rss_total // 2**20,
        "quick": cfg.quick,
        "machine": platform.platform(),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    write_report(report, cfg.out, report.pop("timing_rows"))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seqr simulate", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/domains"))
    parser.add_argument("--out", type=Path, default=Path("runs/simulation"))
    parser.add_argument("--domains", default="", help="comma-separated subfolders of --data")
    parser.add_argument("--base-model", default=None, help="known name or local model folder")
    parser.add_argument("--steps", type=int, default=None, help="training steps per client")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="4 domains, few steps (CI)")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="evaluate the registry already in --out"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM (kill, CI timeouts) unwinds like Ctrl-C, so the SuperLink and Ray are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    overrides: dict[str, Any] = {}
    if args.evaluate_only:
        overrides["evaluate_only"] = True
    if args.domains:
        overrides["domains"] = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    for key, value in (("base_model", args.base_model), ("train_steps", args.steps),
                       ("train_seq_len", args.seq_len)):  # fmt: skip
        if value is not None:
            overrides[key] = value
    try:
        if args.quick:
            cfg = SimulateConfig.quick_defaults(args.data, args.out, **overrides)
        else:
            cfg = replace(SimulateConfig(args.data, args.out), **overrides)
        report = run(cfg)
    except SeqrError as exc:
        print(f"seqr simulate: {exc}")
        return 2
    methods = report["evaluation"]["methods"]
    accuracies = [f"{m} {v['routing_accuracy']:.3f}" for m, v in methods.items()
                  if "routing_accuracy" in v]  # fmt: skip
    print("\nrouting accuracy (test): " + ", ".join(accuracies))
    print(f"wrote {cfg.out / 'report.md'} (wall time {report['run']['wall_seconds']} s)")
    return 0
