"""The routing benchmark runs end to end on a small grid and reports what it promises."""

import json

from seqr.sim.bench_routing import RoutingBenchConfig, macs_per_token, main, run


def test_small_grid_writes_json_plot_and_exact_agreement(tmp_path):
    cfg = RoutingBenchConfig(
        ns=(8, 32), d_ins=(64,), ranks=(4,), tokens=64, repeats=1, out=tmp_path
    )
    result = run(cfg)
    assert (tmp_path / "routing.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "routing.json").read_text())
    assert len(saved["results"]) == 2 * 4
    seqr = [row for row in saved["results"] if row["method"] == "seqr"]
    assert all(row["agreement_ties_excluded"] == 1.0 for row in seqr)
    assert all(row["max_rel_norm_error"] < 1e-4 for row in seqr)
    assert result["machine"]["gemm_gflops_start"] > 0


def test_cost_model_matches_the_papers_table():
    # d_in = 4096, r = 16, N = 1024 (arXiv 2509.18093's setting):
    # SpectR 67M, ARROW 4.2M, SEQR 0.33M multiply-adds.
    assert macs_per_token("spectr", 1024, 4096, 16, 4096) == 67_108_864
    assert macs_per_token("arrow", 1024, 4096, 16, 4096) == 4_194_304
    assert macs_per_token("seqr", 1024, 4096, 16, 4096) == 327_680


def test_cli_runs_and_prints_a_table(tmp_path, capsys):
    argv = ["--ns", "4", "--d-ins", "32", "--ranks", "4", "--tokens", "16", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "seqr" in out and "brute_force" in out and "GEMM rate" in out
