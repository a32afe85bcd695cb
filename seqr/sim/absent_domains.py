"""Adapters whose domain the traffic lacks, measured on a score dump (docs/RESULTS.md).

Query statistics standardise each adapter's decision score over the traffic; an adapter none of
the traffic belongs to still wins the inputs where its score's upper tail beats the right
adapter's. For each domain in turn its rows leave the traffic while its adapter stays in the
library, and the share of the remaining test rows routed to it is what it takes (ideally 0):
offline (statistics over the validation rows, as the report's calibrations) and through
`seqr serve`'s own QueryPool (its caps, decay and warm-up), replaying the rows as a stream.

usage: python -m seqr.sim.absent_domains RUN/scores.npz
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from seqr.consumer.serve.config import PoolConfig
from seqr.consumer.serve.pool import QueryPool
from seqr.consumer.serve.scoring import Calibration
from seqr.core.model_routing.reference import pool_statistics
from seqr.sim.score_dump import ScoreDump, load_scores

CALIBRATIONS = ("queries", "queries per module", "own")


def decision_scores(dump: ScoreDump, pool: np.ndarray, calibration: str) -> np.ndarray:
    """(S, N) every row's decision scores under statistics measured on the rows ``pool``
    (bool, (S,)): query statistics with and without the decision standardised, or own."""
    raw = dump.raw["seqr"].astype(np.float64)
    if calibration == "own":
        return dump.module_scores("seqr").mean(axis=1)
    mean, std = pool_statistics(raw[pool], standardize_decision=calibration == "queries")
    return ((raw - mean) / std).mean(axis=1)


def absent_capture(dump: ScoreDump, domain: int, calibration: str) -> float:
    """Share of the other domains' test rows routed to ``domain``'s adapter when the traffic
    (the validation rows statistics come from, and the test rows) lacks that domain."""
    present = dump.labels != domain
    scores = decision_scores(dump, present & ~dump.is_test, calibration)
    return float((scores[present & dump.is_test].argmax(axis=1) == domain).mean())


def pool_replay(dump: ScoreDump, rows: np.ndarray, config: PoolConfig) -> np.ndarray:
    """The adapter `seqr serve --aggregation mean` routes each of ``rows`` (in that order)
    to: the pool's calibration at that moment (the adapters' own statistics until it is
    warm), argmax over the routable adapters of the mean module z-score; then the row joins
    the pool. (Soft votes need each token's scores, which a dump does not keep.)"""
    raw = dump.raw["seqr"].astype(np.float64)
    own_mean, own_std = (torch.from_numpy(a.astype(np.float64)) for a in dump.calibrations["seqr"])
    n = len(dump.adapters)
    shas = tuple(f"adapter-{i}" for i in range(n))  # the pool keys adapters by content hash
    own = Calibration("own", own_mean, own_std, torch.ones(n, dtype=torch.bool))
    pool, picks = QueryPool(config), []
    for row in rows:
        calibration = pool.calibration(shas, dump.adapters, dump.module_names, own)
        scores = torch.from_numpy(raw[row])
        z = ((scores - calibration.mean) / calibration.std).mean(dim=0)
        pick = int(z.masked_fill(~calibration.routable, -torch.inf).argmax())
        picks.append(pick)
        pool.add(shas, dump.module_names, shas[pick], scores)
    return np.array(picks)


def pool_absent_capture(dump: ScoreDump, domain: int, config: PoolConfig, seed: int = 0) -> float:
    """The same share through the serving pool: the other domains' rows (validation and test)
    in a random order, measured on the second half of the stream (the pool warm)."""
    order = np.random.default_rng(seed).permutation(len(dump.labels))
    rows = order[dump.labels[order] != domain]
    later = pool_replay(dump, rows, config)[len(rows) // 2 :]
    return float((later == domain).mean())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    dump = load_scores(Path(args[0]))
    print("| absent domain | " + " | ".join(CALIBRATIONS) + " | seqr serve's pool |")
    print("|---" * (len(CALIBRATIONS) + 2) + "|")
    for k, name in enumerate(dump.adapters):
        shares = [absent_capture(dump, k, c) for c in CALIBRATIONS]
        shares.append(pool_absent_capture(dump, k, PoolConfig()))
        print(f"| {name} | " + " | ".join(f"{s:.1%}" for s in shares) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
