"""Adapters the traffic lacks (seqr.sim.absent_domains): query statistics let a domain-less
adapter win inputs that own statistics keep from it, and the serving pool's replay routes
exactly as offline query statistics over the same prompts when its caps and decay are off."""

from __future__ import annotations

import numpy as np

from seqr.consumer.serve.config import PoolConfig
from seqr.sim.absent_domains import absent_capture, decision_scores, main, pool_replay
from seqr.sim.score_dump import ScoreDump, load_scores

DOMAINS, MODULES, ROWS_PER_DOMAIN = 3, 5, 40


def synthetic_dump(seed: int = 0) -> ScoreDump:
    """Three domains whose adapters score their own rows 1.0 higher, and a fourth adapter,
    "stray", whose domain has no rows: its scores are noise around the others' foreign level.
    Own statistics claim each adapter's in-domain level (the stray's as high as the others')."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(DOMAINS), ROWS_PER_DOMAIN)
    raw = rng.normal(2.0, 0.3, (len(labels), MODULES, DOMAINS + 1))
    raw[np.arange(len(labels)), :, labels] += 1.0
    return ScoreDump(
        adapters=("a", "b", "c", "stray"),
        module_names=tuple(f"m{i}" for i in range(MODULES)),
        module_layers=np.arange(MODULES),
        labels=labels,
        is_test=np.arange(len(labels)) % 2 == 1,
        chunks=np.tile(np.arange(ROWS_PER_DOMAIN), DOMAINS),
        raw={"seqr": raw},
        calibrations={
            "seqr": (np.full((MODULES, DOMAINS + 1), 3.0), np.full((MODULES, DOMAINS + 1), 0.3))
        },  # fmt: skip
    )


def test_query_statistics_let_an_adapter_without_traffic_win_what_own_statistics_do_not():
    dump = synthetic_dump()
    stray = dump.adapters.index("stray")
    assert absent_capture(dump, stray, "own") == 0.0
    assert absent_capture(dump, stray, "queries") > 0.05  # its standardised noise wins some
    assert absent_capture(dump, stray, "queries per module") > 0.0


def test_pool_replay_routes_as_query_statistics_over_the_prompts_before_each():
    # Caps off, no decay, refreshed every prompt: the pool's moments are plain query
    # statistics over the prompts already routed, decision standardised.
    dump = synthetic_dump(seed=1)
    config = PoolConfig(capacity=1 << 12, max_share=1.0, half_life=1 << 30, warm_sequences=2,
                        warm_adapters=1, refresh_every=1)  # fmt: skip
    rows = np.random.default_rng(2).permutation(len(dump.labels))
    picks = pool_replay(dump, rows, config)
    for i in range(3, len(rows)):
        seen = np.zeros(len(dump.labels), dtype=bool)
        seen[rows[:i]] = True
        expected = decision_scores(dump, seen, "queries")[rows[i]].argmax()
        assert picks[i] == expected, f"prompt {i}"
    accuracy = float((picks[3:] == dump.labels[rows[3:]]).mean())
    assert accuracy < 1.0  # the stray adapter takes some: the phenomenon, through the pool


def test_absent_domains_table_from_a_saved_dump(tmp_path, capsys):
    dump = synthetic_dump()
    mean, std = dump.calibrations["seqr"]
    path = tmp_path / "scores.npz"
    np.savez(path, adapters=np.array(dump.adapters), module_names=np.array(dump.module_names),
             module_layers=dump.module_layers, labels=dump.labels, is_test=dump.is_test,
             chunks=dump.chunks, **{"raw.seqr": dump.raw["seqr"], "mean.seqr": mean,
                                    "std.seqr": std})  # fmt: skip
    assert load_scores(path).adapters == dump.adapters
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| absent domain | queries |")
    stray = next(line for line in lines if line.startswith("| stray |"))
    assert stray.split("|")[4].strip() == "0.0%"  # own statistics: nothing
    assert main([]) == 2
