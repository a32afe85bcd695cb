"""`seqr serve`'s own routing over a simulation's held-out text, replayed as a stream.

The simulation's report routes with query statistics measured once over the validation rows. A
server measures them as it goes (seqr.consumer.serve.pool: own statistics until warm, decay,
per-adapter caps) and, by default, turns to soft token votes once the pool holds their
statistics. This replays every held-out row of a run (validation and test, in a random order,
in batches of ``refresh_every`` prompts, as the server refreshes its statistics) through the
server's routing step (engine.route_prompts) once per way of deciding (the mean of z-scores,
soft votes, soft votes with the loss check: STREAMS), and reports accuracy over the second half
of the stream (the pool warm), with Wilson intervals and McNemar between them.

usage: python -m seqr.sim.serve_replay RUN [--data DIR] [--seed K] [--pool-warm N]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seqr.consumer.serve.config import PoolConfig
from seqr.consumer.serve.engine import route_prompts
from seqr.consumer.serve.live import ServedVersion
from seqr.consumer.serve.pool import QueryPool
from seqr.sim.significance import mcnemar_exact, wilson_interval

# name -> how its pool decides (PoolConfig fields); the last is `seqr serve`'s default
STREAMS: dict[str, dict[str, Any]] = {
    "mean": {"aggregation": "mean"},
    "soft_vote": {"aggregation": "soft_vote", "loss_check_margin": 0.0},
    "soft_vote_loss_checked": {"aggregation": "soft_vote"},
}
# McNemar pairs (first, second): each way against the one before it
PAIRS = (("soft_vote", "mean"), ("soft_vote_loss_checked", "soft_vote"))


@dataclass(frozen=True)
class Replay:
    picks: np.ndarray  # (S,) the adapter each row of the stream was routed to
    decided_by: list[str]  # per row: "own", or the aggregation under query statistics


def replay(
    version: ServedVersion, ids: torch.Tensor, order: np.ndarray, config: PoolConfig
) -> Replay:
    """Route the rows ``ids[order]`` in that order, ``refresh_every`` at a time, as `seqr
    serve` routes ``auto`` prompts with a pool of this config."""
    pool, picks, decided_by = QueryPool(config), [], []
    batches = range(0, len(order), config.refresh_every)
    for start in tqdm(batches, desc=f"replay ({config.aggregation}, check "
                      f"{config.loss_check_margin:g})", unit="batch"):  # fmt: skip
        rows = torch.as_tensor(order[start : start + config.refresh_every])
        calibration, decision = route_prompts(version, pool, ids[rows], torch.ones_like(ids[rows]))
        picks += decision.indices
        how = "own" if calibration.kind == "own" else calibration.aggregation
        decided_by += [how] * len(rows)
    return Replay(np.array(picks), decided_by)


def summarise(replays: dict[str, Replay], labels: np.ndarray) -> dict[str, Any]:
    """Accuracy over the whole stream and over its second half, per stream; McNemar of each
    pair in PAIRS on the second half."""
    half = len(labels) // 2
    out: dict[str, Any] = {"rows": len(labels), "second_half_rows": len(labels) - half}
    right = {}
    for name, run in replays.items():
        correct = run.picks == labels
        right[name] = correct[half:].tolist()
        low, high = wilson_interval(int(correct[half:].sum()), len(labels) - half)
        out[name] = {
            "accuracy": float(correct.mean()),
            "second_half_accuracy": float(correct[half:].mean()),
            "second_half_ci95": [low, high],
            "second_half_decided_by": dict(sorted(Counter(run.decided_by[half:]).items())),
        }
    for first, second in PAIRS:
        if first in right and second in right:
            test = mcnemar_exact(right[first], right[second])
            out[f"mcnemar_{first}_vs_{second}"] = vars(test)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqr.sim.serve_replay", description=__doc__)
    parser.add_argument("run", type=Path, help="a `seqr simulate` output folder")
    parser.add_argument("--data", type=Path, default=None, help="its --data (default: as run)")
    parser.add_argument("--seed", type=int, default=0, help="of the stream's order")
    parser.add_argument("--pool-warm", type=int, default=PoolConfig().warm_sequences,
                        help="as `seqr serve --pool-warm`")  # fmt: skip
    args = parser.parse_args(argv)
    from seqr.consumer.router import RouterConfig
    from seqr.consumer.serve.live import build_version
    from seqr.consumer.serve.source import RegistrySource
    from seqr.core.atomic_write import write_atomic
    from seqr.core.base_model import load_base_model
    from seqr.core.errors import DataError
    from seqr.core.strict_json import loads_strict
    from seqr.registry import AuditConfig
    from seqr.sim.federation_run import FederationResult
    from seqr.sim.registry_eval import heldout_chunks

    result = FederationResult.load(args.run / "work")
    report = loads_strict((args.run / "report.json").read_bytes(), what="report.json",
                          max_bytes=64 << 20)  # fmt: skip
    fed, run = result.federation, report["run"]
    base = load_base_model(fed.base_model, expected_sha256=fed.base_model_sha256)
    audit = AuditConfig(expected_root_sha256=result.root_sha256)
    audited = RegistrySource(str(result.registry), audit_config=audit).audited()
    version = build_version(base, audited, RouterConfig(), ("auto", "base"))
    data = args.data or Path(run["data"])
    heldout = heldout_chunks([data / name for name in version.names], base.tokenizer, fed,
                             int(run["held_out_sequences_per_domain"]))  # fmt: skip
    if any(len(chunks) == 0 for chunks in heldout.values()):
        raise DataError(f"a domain of {version.names} has no held-out text in {data}")
    ids = torch.as_tensor(np.concatenate(list(heldout.values())), dtype=torch.long)
    labels = np.concatenate([[i] * len(c) for i, c in enumerate(heldout.values())])
    order = np.random.default_rng(args.seed).permutation(len(labels))
    replays: dict[str, Replay] = {
        name: replay(version, ids, order, PoolConfig(warm_sequences=args.pool_warm, **how))
        for name, how in STREAMS.items()
    }
    summary = {"run": str(args.run), "seed": args.seed, **summarise(replays, labels[order])}
    write_atomic(args.run / "serve_replay.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
