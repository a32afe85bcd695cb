"""`seqr simulate`: the whole federation on this machine, then the client-side evaluation.

K clients each hold one private text domain. Every domain is checked for readable text
first (a bad one is refused before anything starts). Through a real Flower run (our own
SuperLink in simulation mode, `flwr run` of the seqr app) each client trains, calibrates,
signs and submits; the server admits and publishes the signed registry. Then, as every
client does, the registry is read, audited, and its adapters are routed with SEQR on
held-out text of every domain, against the baselines (seqr/sim/evaluate.py). While it runs,
one line per client change and ``status.json`` in --out (seqr/sim/status.py). Output: the
registry and a report (report.html, report.md, report.json, PNG plots) in --out.
``--seeds N`` runs the whole simulation N times (seeds 0..N-1 of the shared A and of the
data split and order) and reports mean and spread (seqr/sim/seeds.py).
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from seqr.cli.help import DEFAULT_BASE_MODEL_HELP, RawDefaultsHelpFormatter
from seqr.core.errors import ConfigError, DataError, SeqrError

# Ten well-separated domains of `seqr data prepare` (code, manuals, dictionary, law, drama,
# poetry, jokes in three languages); any folder of domain subfolders works with --domains.
DEFAULT_DOMAINS = (
    "python_code", "man_pages", "foldoc_computing", "licences", "shakespeare",
    "fortunes_en", "fortunes_de", "fortunes_es", "gcide_zoology", "python_docs",
)  # fmt: skip
MAX_SEEDS = 20
log = logging.getLogger("seqr.simulate")


@dataclass(frozen=True)
class SimulateConfig:
    data: Path
    out: Path
    domains: tuple[str, ...] = ()  # () = DEFAULT_DOMAINS that exist, else every subfolder
    base_model: str = "SmolLM2-135M-Instruct"
    # 50 steps x 8 x 128 tokens per client (~210 training tokens/s per core for SmolLM2 on
    # CPU: about 15 minutes per client on a 2-core EPYC, two clients at a time).
    train_steps: int = 50
    train_seq_len: int = 128
    train_batch_size: int = 8
    # Held-out chunks per domain, alternately validation and test: 200 gives 100 test
    # sequences per domain where the text has them (fewer where a domain has fewer).
    eval_sequences_per_domain: int = 200
    # Public reference text for seqr_public / seqr_blend: this many chunks of every domain
    # folder in --data that no client holds.
    reference_chunks_per_domain: int = 16
    client_cpus: int = 1  # Ray resources per simulated client (2 clients at once on 2 cores)
    timing_ns: tuple[int, ...] = (4, 16, 64, 256, 1024)
    seed: int = 0  # the shared A's seed and the data split and order's (federation a/data-seed)
    per_token_losses: bool = False  # also the held-out loss of per-token routing (slower)
    merge_baseline: bool = False  # also the held-out loss of the uniform merge (slower)
    dump_scores: bool = False  # write the per-sequence scores to scores.npz (score_dump.py)
    quick: bool = False
    evaluate_only: bool = False  # reuse the registry of an earlier run in --out
    # Evaluate a run (each seed's) whose federation already finished in --out; run the others.
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("train_steps", "train_seq_len", "train_batch_size", "client_cpus",
                     "reference_chunks_per_domain"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_sequences_per_domain < 2:
            raise ConfigError("eval_sequences_per_domain must be >= 2 (validation + test)")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed must be in [0, 2**31), got {self.seed}")

    @classmethod
    def quick_defaults(cls, data: Path, out: Path, **kw: Any) -> SimulateConfig:
        """--quick: the whole path in minutes (4 domains, few steps, short sequences)."""
        base = {"train_steps": 12, "train_seq_len": 48, "eval_sequences_per_domain": 12,
                "reference_chunks_per_domain": 4, "timing_ns": (4, 16, 64),
                "quick": True}  # fmt: skip
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


def validate_domains(domains: list[Path]) -> None:
    """Every domain must hold readable text before any client starts: a bad one would only
    fail after the others trained. DataError names each bad domain and why."""
    from seqr.core.textdata import read_text_folder

    bad = []
    for domain in domains:
        try:
            read_text_folder(domain)
        except DataError as exc:
            bad.append(f"domain {domain.name!r}: {exc}")
    if bad:
        raise DataError(
            "these domains hold no readable text; fix or leave them out with --domains:\n  "
            + "\n  ".join(bad)
        )


def federation_for(cfg: SimulateConfig) -> Any:
    from seqr.core.federation import FederationConfig

    return FederationConfig(
        base_model=cfg.base_model,
        train_steps=cfg.train_steps,
        train_seq_len=cfg.train_seq_len,
        train_batch_size=cfg.train_batch_size,
        calib_max_sequences=64 if cfg.quick else 128,
        train_heldout_fraction=0.1,
        a_seed=cfg.seed,
        data_seed=cfg.seed,
    )


def run(cfg: SimulateConfig) -> dict[str, Any]:
    from seqr.sim.federation_run import FederationResult, run_federation
    from seqr.sim.registry_eval import evaluate_registry
    from seqr.sim.report import write_report
    from seqr.sim.status import StatusBoard, client_outcomes

    domains = pick_domains(cfg)
    validate_domains(domains)
    if cfg.resume and not cfg.evaluate_only and FederationResult.finished(cfg.out / "work"):
        log.info("the federation already finished in %s: evaluating it again", cfg.out)
        cfg = replace(cfg, evaluate_only=True)
    # Refused before anything is written: a run never overwrites an earlier one's files.
    if cfg.evaluate_only:
        federation = FederationResult.load(cfg.out / "work")
    elif (cfg.out / "registry").exists():
        raise ConfigError(
            f"{cfg.out / 'registry'} already exists; pass a new --out (runs never overwrite), "
            "or --evaluate-only to evaluate it again"
        )
    progress_dir = cfg.out / "work" / "progress"
    board = StatusBoard(cfg.out, [d.name for d in domains], progress_dir)
    started = time.perf_counter()
    try:
        if not cfg.evaluate_only:
            cfg.out.mkdir(parents=True, exist_ok=True)
            board.begin("federation", f"{len(domains)} clients train, sign and submit")
            with board.following():
                federation = run_federation(cfg, federation_for(cfg), domains, progress_dir)
        board.poll()  # the final state of every client (also after an earlier run)
        evaluated = time.perf_counter()
        report = evaluate_registry(
            cfg, federation, domains, stage=lambda name, total: _stage(board, name, total)
        )
        board.begin("write the report")
        report["clients"] = client_outcomes(board, report["not_admitted"])
        report["run"] = run_section(cfg, federation, evaluated, board)
        write_report(report, cfg.out, report.pop("timing_rows"))
    except BaseException:
        board.finish("failed")
        raise
    board.finish()
    log.info("simulation took %.0f s", time.perf_counter() - started)
    return report


def _stage(board: Any, name: str, total: int) -> Any:
    board.begin(f"evaluation: {name}", total=total)
    return board.advance


def run_section(cfg: SimulateConfig, federation: Any, evaluated: float, board: Any) -> dict:
    """What the user asked for and what it took, readable (report.py shows it as a table)."""
    evaluation_s = time.perf_counter() - evaluated
    return {
        "clients": len(board.clients),
        "base_model": cfg.base_model,
        "training": {
            "steps": cfg.train_steps,
            "batch_size": cfg.train_batch_size,
            "sequence_tokens": cfg.train_seq_len,
        },  # fmt: skip
        "seed": cfg.seed,
        "held_out_sequences_per_domain": cfg.eval_sequences_per_domain,
        "per_token_losses": cfg.per_token_losses,
        "merge_baseline": cfg.merge_baseline,
        "dump_scores": cfg.dump_scores,
        "quick": cfg.quick,
        "evaluate_only": cfg.evaluate_only,
        "federation_seconds": round(federation.seconds, 1),
        "evaluation_seconds": round(evaluation_s, 1),
        "wall_seconds": round(federation.seconds + evaluation_s, 1),
        "stages": board.stage_seconds(),
        "peak_rss_mib_evaluation": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "peak_rss_mib_per_client": max(
            (v for k, v in federation.peak_rss_by_process.items() if k.startswith("ray::Client")),
            default=0,
        )
        // 2**20,
        "peak_rss_mib_federation_total": federation.peak_rss_total // 2**20,
        "machine": platform.platform(),
        "data": str(cfg.data),
        "out": str(cfg.out),
    }


def positive_int(low: int = 1, high: int = 10**7) -> Any:
    """An argparse type: a whole number in [low, high], else a clear usage error (exit 2;
    argparse names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr simulate",
        description=__doc__,
        formatter_class=RawDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/domains"),
        help="one folder of text per domain (seqr data prepare)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/simulation"), help="run folder to create"
    )
    parser.add_argument("--domains", default="", help="comma-separated subfolders of --data")
    parser.add_argument("--base-model", default=None, help=DEFAULT_BASE_MODEL_HELP)
    parser.add_argument("--steps", type=positive_int(), help="training steps per client")
    parser.add_argument(
        "--seq-len",
        type=positive_int(8, 32768),
        help="tokens per training sequence (default: the federation's)",
    )
    parser.add_argument(
        "--eval-sequences",
        type=positive_int(2),
        help="held-out chunks per domain, half validation, half test (default 200; quick 12)",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int(1, MAX_SEEDS),
        default=1,
        help="run the whole simulation for seeds 0..N-1 (shared A, data split and order) "
        "into --out/seed-K and report mean and spread",
    )
    parser.add_argument(
        "--seed",
        type=positive_int(0, 2**31 - 1),
        help="run one seed K of the shared A and of the data split and order (default 0); "
        "--seeds N runs 0..N-1 instead",
    )
    parser.add_argument(
        "--per-token-losses",
        action="store_true",
        help="also measure the held-out loss of per-token routing (two more passes)",
    )
    parser.add_argument(
        "--merge-baseline",
        action="store_true",
        help="also measure the held-out loss of the uniform merge of all adapters (one more "
        "pass over the test rows)",
    )
    parser.add_argument(
        "--dump-scores",
        action="store_true",
        help="also write every held-out sequence's module scores to scores.npz in --out, to "
        "score routing variants offline (seqr/sim/score_dump.py)",
    )
    parser.add_argument("--quick", action="store_true", help="4 domains, few steps (minutes)")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="evaluate the registry already in --out"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="a run (with --seeds: each seed's) whose federation already finished in --out is "
        "evaluated again, the others run",
    )
    args = parser.parse_args(argv)
    if args.seed is not None and args.seeds > 1:
        parser.error("give --seed K (one run) or --seeds N (seeds 0..N-1), not both")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM (kill, CI timeouts) unwinds like Ctrl-C, so the SuperLink and Ray are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    overrides: dict[str, Any] = {}
    if args.evaluate_only:
        overrides["evaluate_only"] = True
    for flag in ("per_token_losses", "merge_baseline", "dump_scores", "resume"):
        if getattr(args, flag):
            overrides[flag] = True
    if args.domains:
        overrides["domains"] = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    for key, value in (("base_model", args.base_model), ("train_steps", args.steps),
                       ("seed", args.seed),
                       ("train_seq_len", args.seq_len),
                       ("eval_sequences_per_domain", args.eval_sequences)):  # fmt: skip
        if value is not None:
            overrides[key] = value
    try:
        if args.quick:
            cfg = SimulateConfig.quick_defaults(args.data, args.out, **overrides)
        else:
            cfg = replace(SimulateConfig(args.data, args.out), **overrides)
        if args.seeds > 1:
            from seqr.sim.seeds import run_seeds

            summary = run_seeds(cfg, args.seeds, run)
            print(f"wrote {cfg.out / 'report.html'} ({args.seeds} seeds)")
            return 0 if summary else 1
        report = run(cfg)
    except SeqrError as exc:
        print(f"seqr simulate: {exc}", file=sys.stderr)
        return 2
    methods = report["evaluation"]["methods"]
    accuracies = [f"{m} {v['routing_accuracy']:.3f}" for m, v in methods.items()
                  if "routing_accuracy" in v]  # fmt: skip
    print("\nrouting accuracy (test): " + ", ".join(accuracies))
    print(f"wrote {cfg.out / 'report.html'} (wall time {report['run']['wall_seconds']} s)")
    return 0
