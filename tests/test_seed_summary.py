"""The summary over seeds (`seqr simulate --seeds N`): mean and spread per method and per
domain, McNemar results kept per seed and aligned with their seed, files written."""

from __future__ import annotations

import json

import pytest

from seqr.sim.seeds import summarise, write_summary


def _report(acc_default: float, acc_arrow: float, tests: list[dict], alt: str) -> dict:
    def method(acc: float, per_domain: dict[str, float], loss: float) -> dict:
        return {"routing_accuracy": acc, "heldout_loss": loss,
                "per_domain": {d: {"accuracy": a} for d, a in per_domain.items()}}  # fmt: skip

    return {
        "evaluation": {
            "adapters": ["a", "b"],
            "seqr_default": "seqr_queries",
            "seqr_best_alternative": alt,
            "test_sequences": 200,
            "agreement_default_brute_force": 1.0,
            "significance": tests,
            "methods": {
                "seqr_queries": method(acc_default, {"a": acc_default, "b": 1.0}, 2.1),
                "arrow": method(acc_arrow, {"a": acc_arrow, "b": 0.5}, 2.2),
                "oracle": {"heldout_loss": 2.0},
            },
        },
        "run": {"wall_seconds": 60.0},
    }


def _test(second: str, first_only: int, second_only: int, p: float) -> dict:
    return {"first": "seqr_queries", "second": second, "first_only": first_only,
            "second_only": second_only, "p_value": p}  # fmt: skip


def test_summary_gives_mean_and_spread_per_method_and_domain_and_keeps_mcnemar_per_seed(tmp_path):
    seed0 = [_test("arrow", 10, 2, 0.04), _test("seqr_blend", 3, 1, 0.6)]
    seed1 = [_test("arrow", 12, 1, 0.003), _test("seqr", 2, 2, 1.0)]
    reports = [_report(0.9, 0.8, seed0, "seqr_blend"), _report(0.8, 0.7, seed1, "seqr")]
    summary = summarise(reports)
    assert summary["accuracy"]["seqr_queries"]["mean"] == pytest.approx(0.85)
    assert summary["accuracy"]["seqr_queries"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert summary["accuracy"]["arrow"]["min"] == 0.7
    assert summary["accuracy_per_domain"]["a"]["arrow"]["mean"] == pytest.approx(0.75)
    assert summary["accuracy_per_domain"]["b"]["seqr_queries"]["std"] == 0.0
    assert summary["heldout_loss_vs_oracle"]["arrow"]["mean"] == pytest.approx(0.1)
    # A comparison made in one seed only stays in that seed's column, not shifted to seed 0.
    assert summary["mcnemar"]["seqr_queries vs seqr"][0] is None
    assert summary["mcnemar"]["seqr_queries vs seqr"][1]["p_value"] == 1.0
    assert [t["first_only"] for t in summary["mcnemar"]["seqr_queries vs arrow"]] == [10, 12]
    write_summary(summary, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| seqr_queries vs seqr | — | 2 vs 2, p = 1 |" in md
    assert "| a | 0.850 (0.80–0.90) | 0.750 (0.70–0.80) |" in md
    assert json.loads((tmp_path / "report.json").read_text())["seeds"] == 2
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_summary_names_a_seed_that_routed_fewer_domains_and_why(tmp_path):
    full = _report(0.9, 0.8, [], "seqr")
    short = _report(0.8, 0.7, [], "seqr")
    short["not_admitted"] = ["c"]
    short["clients"] = [{"client": "c", "verdict": "rejected", "reason": "implausible_stats: x"}]
    summary = summarise([full, short])
    assert summary["not_admitted_per_seed"] == [{}, {"c": "rejected: implausible_stats: x"}]
    write_summary(summary, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "seed 1: c (rejected: implausible_stats: x)" in md
    write_summary(summarise([full, full]), tmp_path / "all")
    assert "Not every seed" not in (tmp_path / "all" / "report.md").read_text()


def test_summary_pools_the_claim_split_over_seeds_and_says_it(tmp_path):
    def split(claimed: tuple[int, int], unclaimed: tuple[int, int]) -> dict:
        rows = claimed[1] + unclaimed[1]
        return {g: {"correct": c, "total": t, "share": t / rows}
                for g, (c, t) in (("claimed", claimed), ("unclaimed", unclaimed))}  # fmt: skip

    reports = [_report(0.9, 0.8, [], "seqr"), _report(0.8, 0.7, [], "seqr")]
    reports[0]["evaluation"]["default_by_claim"] = split((180, 190), (5, 10))
    reports[1]["evaluation"]["default_by_claim"] = split((170, 180), (10, 20))
    pooled = summarise(reports)["default_by_claim"]
    assert pooled["unclaimed"]["total"] == 30 and pooled["unclaimed"]["correct"] == 15
    assert pooled["unclaimed"]["share"] == pytest.approx(30 / 400)
    assert pooled["claimed"]["accuracy"] == pytest.approx(350 / 370)
    write_summary(summarise(reports), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "30 of 400 test sequences (7.5%) were claimed by no adapter" in md
    assert "routed 50.0% (95% interval" in md
    # A seed evaluated before the split existed: no pooled numbers, no sentence.
    del reports[1]["evaluation"]["default_by_claim"]
    assert summarise(reports)["default_by_claim"] is None
    write_summary(summarise(reports), tmp_path / "old")
    assert "claimed by no adapter" not in (tmp_path / "old" / "report.md").read_text()
