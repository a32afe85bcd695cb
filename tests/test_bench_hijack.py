"""The hijack benchmark end to end on the tiny model: the lie wins without checks, the
checks refuse it, and the bound sweep's shortcut equals RoutedModel's own scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import copy_texts, tiny_model_dir

from seqr.core.errors import AdmissionError
from seqr.core.stats import NormStatistics
from seqr.core.stats_plausibility import MAD_TO_STD, check_stats_plausible
from seqr.sim.bench_hijack import BOUND, CRAFTED, LIAR, main, query_scores
from seqr.sim.bench_hijack_lies import bound_stats, crafted_b, scaled_stats, sequence_scores

DOMAINS = {
    "a": ("bisect.py", "heapq.py"),
    "b": ("textwrap.py", "string.py"),
    "c": ("colorsys.py", "keyword.py"),
    "d": ("glob.py", "fnmatch.py"),
}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[type-arg]
    root = tmp_path_factory.mktemp("hijack")
    for name, files in DOMAINS.items():
        copy_texts(root / "domains" / name, files)
    argv = [
        "--base-model", str(tiny_model_dir()), "--data", str(root / "domains"),
        "--honest", "a", "b", "c", "--liar", "d", "--max-files", "2", "--rank", "4",
        "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--calib-sequences", "8",
        "--eval-sequences", "8", "--probe-tokens", "1024", "--out", str(root / "out"),
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads((root / "out" / "hijack.json").read_text()), root / "out"


def test_lie_captures_without_checks_and_is_refused_with_them(result) -> None:  # type: ignore[no-untyped-def]
    data, out = result
    verdicts = {name: (v["status"], v["reason"]) for name, v in data["verdicts"].items()}
    assert verdicts[LIAR] == ("rejected", "implausible_stats")
    assert all(verdicts[d] == ("admitted", "") for d in ("a", "b", "c"))
    assert verdicts[BOUND] == ("admitted", "")  # the largest lie the bounds still accept
    scenarios = data["scenarios"]
    assert scenarios["honest only"]["capture_share"] == 0.0
    assert scenarios["liar, no checks"]["capture_share"] >= 0.5
    assert scenarios["liar, with checks"]["capture_share"] == 0.0
    assert LIAR not in scenarios["liar, with checks"]["adapters"]
    assert data["unchecked_registry_entries"] == 4  # three honest + the liar, unchecked
    assert data["sequences"] == 3 * 8
    assert (out / "hijack.png").stat().st_size > 10_000


def test_sweep_shortcut_equals_routed_model_scores(result) -> None:  # type: ignore[no-untyped-def]
    data, _ = result
    assert data["sweep_score_parity_max_abs"] < 1e-4
    grid = {(r["max_mean_z"], r["max_sigma_ratio"]) for r in data["bound_sweep"]}
    assert (1.0, 3.0) in grid and len(grid) == len(data["bound_sweep"])


def test_bound_stats_sit_just_inside_both_bounds() -> None:
    rng = np.random.default_rng(0)
    norms = {"m": rng.gamma(4.0, 0.5, size=500)}
    stats = bound_stats(norms, max_mean_z=1.0, max_sigma_ratio=3.0)
    m = stats.modules["m"]
    center = float(np.median(norms["m"]))
    spread = MAD_TO_STD * float(np.median(np.abs(norms["m"] - center)))
    assert center - spread < m.mean[0] < center - 0.999 * spread
    assert spread / 3 < m.std[0] < 1.001 * spread / 3
    check_stats_plausible(stats, norms, max_mean_z=1.0, max_sigma_ratio=3.0)  # accepted
    for past in ({"past_mean": 0.05}, {"past_std": 0.05}):  # just beyond a bound: refused
        with pytest.raises(AdmissionError):
            beyond = bound_stats(norms, max_mean_z=1.0, max_sigma_ratio=3.0, **past)
            check_stats_plausible(beyond, norms, max_mean_z=1.0, max_sigma_ratio=3.0)
    mu, sigma = norms["m"].mean(), norms["m"].std()
    honest = NormStatistics()
    honest.update("m", norms["m"])
    lie = scaled_stats(honest, 0.5, 0.1)
    assert lie.modules["m"].mean[0] == pytest.approx(0.5 * mu)
    assert lie.modules["m"].std[0] == pytest.approx(0.1 * sigma)
    # A sequence whose module mean equals mu scores (mu - mean) / std.
    score = sequence_scores({"m": np.array([mu])}, lie)
    assert score[0] == pytest.approx(0.5 * mu / (0.1 * sigma))


def test_query_statistics_ignore_any_rescaling_of_an_adapters_scores(result) -> None:  # type: ignore[no-untyped-def]
    """Query statistics are measured on the routed sequences, so neither a claimed (mu, sigma)
    nor a per-module affine change of an adapter's scores (a scaled B) moves its z-scores."""
    rng = np.random.default_rng(1)
    honest = {"m1": rng.gamma(4.0, 0.5, 40), "m2": rng.gamma(2.0, 1.0, 40)}
    liar = {"m1": rng.gamma(3.0, 0.5, 40), "m2": rng.gamma(5.0, 1.0, 40)}
    bent = {"m1": 1e3 * liar["m1"] + 7.0, "m2": 0.01 * liar["m2"] - 2.0}
    assert np.allclose(query_scores([honest, liar]), query_scores([honest, bent]))
    row = result[0]["scenarios"]["liar, query statistics (any claim)"]
    assert row["adapters"][-1] == LIAR and 0.0 <= row["capture_share"] <= 1.0


def test_crafted_rank_1_b_scores_the_cosine_to_the_public_mean_direction() -> None:
    """The weights-only attacker: B = u w^T with w the mean direction of public h / ||h||, so
    its gain on any h is |cos(h, w)|, and w is the unit vector with the largest mean cosine."""
    import torch

    from seqr.core.routing.seqr import SeqrRouter

    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 4, generator=g) + torch.tensor([3.0, 0.0, 1.0, 0.0])
    b = crafted_b({"m": h}, {"m": "m.lora_B"}, {"m.lora_B": np.zeros((6, 4))})["m.lora_B"]
    assert b.shape == (6, 4) and np.linalg.matrix_rank(b) == 1
    unit = h / h.norm(dim=1, keepdim=True)
    w = torch.from_numpy(b[0]).double()
    gain = SeqrRouter(torch.eye(4), torch.from_numpy(b)[None]).norms(h).flatten().double()
    assert torch.allclose(gain / h.norm(dim=1).double(), (unit.double() @ w).abs(), atol=1e-5)
    for _ in range(20):  # no other direction has a larger mean cosine over the public text
        v = torch.randn(4, generator=g).double()
        assert (unit.double() @ (v / v.norm())).mean() <= (unit.double() @ w).mean() + 1e-9


def test_crafted_adapter_is_scored_under_query_statistics(result) -> None:  # type: ignore[no-untyped-def]
    row = result[0]["scenarios"]["crafted rank-1 B, query statistics"]
    assert row["adapters"][-1] == CRAFTED and LIAR not in row["adapters"]
    assert 0.0 <= row["capture_share"] <= 1.0
    assert row["capture_share"] + row["accuracy"] <= 1.0 + 1e-9
