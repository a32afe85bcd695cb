"""`seqr simulate` end to end on a tiny model: a real Flower run (own SuperLink, simulated
SuperNodes), the registry audited, every method evaluated and the report written; progress
while it runs; a client that fails mid-run listed with its reason; several seeds; and bad
input refused before anything starts."""

import json
import shutil
from pathlib import Path

import pytest
from tiny import build_tiny_llama, copy_texts

from seqr.core.errors import ConfigError, DataError
from seqr.registry.audit import audit_registry
from seqr.sim.scale import main as scale_main
from seqr.sim.score_dump import load_scores
from seqr.sim.serve_replay import main as replay_main
from seqr.sim.simulate import SimulateConfig, main, pick_domains, validate_domains

DOMAINS = {"d0": ("bisect.py", "heapq.py"), "d1": ("textwrap.py",), "d2": ("colorsys.py",)}


def tiny_world(tmp_path: Path) -> tuple[Path, Path]:
    model = build_tiny_llama(tmp_path / "model")
    for name, files in DOMAINS.items():
        copy_texts(tmp_path / "data" / name, files)
    return model, tmp_path / "data"


@pytest.mark.flower
def test_simulation_over_two_seeds_reports_progress_failures_and_mean_and_spread(tmp_path, capsys):
    model, data = tiny_world(tmp_path)
    # Readable text, but fewer tokens than one training chunk: this client fails mid-run.
    (data / "d3_short").mkdir()
    (data / "d3_short" / "note.txt").write_text("x = 1\n")
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--base-model", str(model), "--quick",
            "--steps", "3", "--seq-len", "32", "--seeds", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for i, name in enumerate(["d0", "d1", "d2", "d3_short"]):  # one line per client change
        assert f"[client {i + 1}/4] {name}: " in printed  # (3 steps: too quick to see each)
    assert "d3_short: failed: DataError: the node's private data is unusable" in printed
    assert "round 1: reply 4 of 4 from node" in printed  # the server's log, reply by reply
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        assert sorted(e.name for e in audit_registry(run / "registry").report.entries) == sorted(
            DOMAINS
        )
        report = json.loads((run / "report.json").read_text())
        assert sorted(report["evaluation"]["adapters"]) == sorted(DOMAINS)  # the admitted
        assert report["evaluation"]["agreement_seqr_brute_force"] == 1.0
        clients = {c["client"]: c for c in report["clients"]}
        assert clients["d3_short"]["verdict"] == "failed"
        assert clients["d3_short"]["reason"] == "DataError: the node's private data is unusable"
        assert clients["d0"]["verdict"] == "admitted" and len(clients["d0"]["losses"]) == 3
        assert report["run"]["seed"] == seed
        stages = [s["stage"] for s in report["run"]["stages"]]
        assert stages[0] == "federation" and any(s.startswith("evaluation:") for s in stages)
        status = json.loads((run / "status.json").read_text())
        assert status["stage"] == "done" and status["counts"]["failed"] == 1
        html = (run / "report.html").read_text()
        assert "Clients and admission" in html and "data:image/png;base64," in html
    summary = json.loads((out / "report.json").read_text())
    assert summary["seeds"] == 2 and summary["accuracy"]["seqr"]["n"] == 2
    # The run's held-out rows through `seqr serve`'s own routing step, as a stream: own
    # statistics (16 prompts), then the mean under query statistics (16), then soft votes.
    assert replay_main([str(out / "seed-0"), "--pool-warm", "4"]) == 0
    replayed = json.loads((out / "seed-0" / "serve_replay.json").read_text())
    evaluated = json.loads((out / "seed-0" / "report.json").read_text())["evaluation"]
    rows = evaluated["test_sequences"] + evaluated["validation_sequences"]  # every held-out row
    assert replayed["rows"] == rows > 32
    for soft in ("soft_vote", "soft_vote_loss_checked"):  # soft votes decide once warm
        assert replayed[soft]["second_half_decided_by"]["soft_vote"] == rows - 32
    assert replayed["mean"]["second_half_decided_by"] == {"mean": rows - rows // 2}
    assert 0 <= replayed["mcnemar_soft_vote_vs_mean"]["p_value"] <= 1
    assert 0 <= replayed["mcnemar_soft_vote_loss_checked_vs_soft_vote"]["p_value"] <= 1
    assert (out / "report.html").stat().st_size > 1000
    assert (out / "accuracy_over_seeds.png").stat().st_size > 5_000
    # A second run into the same folder never overwrites a registry (nor anything else, its
    # status.json included); evaluation can be rerun.
    before = {p: p.read_bytes() for p in out.rglob("*.json") if p.is_file()}
    assert main(argv) == 2
    assert before == {p: p.read_bytes() for p in out.rglob("*.json") if p.is_file()}
    assert main([*argv, "--evaluate-only"]) == 0
    assert json.loads((out / "seed-1" / "report.json").read_text())["audit"]["entries"] == 3
    # --seed K names one seed: here seed 1's run, evaluated again on its own.
    # --dump-scores keeps the scores the report came from, to try routing variants offline.
    one = [*argv[: argv.index("--seeds")], "--seed", "1", "--evaluate-only", "--dump-scores"]
    one[one.index(str(out))] = str(out / "seed-1")
    assert main(one) == 0
    report = json.loads((out / "seed-1" / "report.json").read_text())
    assert report["run"]["seed"] == 1
    dump = load_scores(out / "seed-1" / "scores.npz")
    default = report["evaluation"]["seqr_default"]
    assert dump.accuracy(default) == report["evaluation"]["methods"][default]["routing_accuracy"]
    # --resume: a seed whose federation finished is evaluated again, one that has none runs.
    shutil.rmtree(out / "seed-1")
    registry_before = {p: p.read_bytes() for p in (out / "seed-0" / "registry").rglob("*")
                       if p.is_file()}  # fmt: skip
    assert main([*argv, "--resume"]) == 0
    reports = [json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)]
    assert [r["run"]["evaluate_only"] for r in reports] == [True, False]
    assert registry_before == {p: p.read_bytes() for p in (out / "seed-0" / "registry").rglob("*")
                               if p.is_file()}  # fmt: skip


def test_domain_without_readable_text_is_refused_before_flower_starts(tmp_path, capsys):
    _, data = tiny_world(tmp_path)
    (data / "d1" / "textwrap.py").unlink()
    (data / "d1" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--base-model", str(tmp_path / "model")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "domain 'd1'" in err and "Traceback" not in err
    assert not (out / "registry").exists()


def test_missing_data_folder_names_the_prepare_command(tmp_path):
    with pytest.raises(DataError, match="seqr data prepare"):
        pick_domains(SimulateConfig(tmp_path / "nope", tmp_path / "out"))


def test_unknown_domain_and_bad_settings_are_refused(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    with pytest.raises(DataError, match="not folders"):
        pick_domains(SimulateConfig(tmp_path / "data", tmp_path / "out", domains=("a", "zz")))
    with pytest.raises(ConfigError, match="train_steps"):
        SimulateConfig(tmp_path / "data", tmp_path / "out", train_steps=0)
    with pytest.raises(DataError, match="domain 'a'"):
        validate_domains([tmp_path / "data" / "a", tmp_path / "data" / "b"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--clients", "0"], "argument --clients: must be in [2, 1000], got 0"),
        (["--clients", "ten"], "argument --clients: must be a whole number"),
        (["--steps", "-1"], "argument --steps: must be in [1, 10000], got -1"),
    ],
)
def test_scale_refuses_bad_arguments_with_a_clear_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        scale_main([*argv, "--out", str(tmp_path / "scale")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "scale").exists()


@pytest.mark.parametrize(
    "argv",
    [["--seeds", "0"], ["--eval-sequences", "1"], ["--steps", "x"], ["--seed", "-1"],
     ["--seed", "1", "--seeds", "3"]],
)  # fmt: skip
def test_simulate_refuses_bad_arguments_with_a_clear_error(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_first_chunks_tokenize_only_what_they_need_and_equal_the_full_split(tmp_path):
    from transformers import AutoTokenizer

    from seqr.core.federation import FederationConfig
    from seqr.core.textdata import load_text_data
    from seqr.sim.registry_eval import first_chunks

    model = build_tiny_llama(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    folder = copy_texts(tmp_path / "ref", ("bisect.py", "heapq.py", "textwrap.py", "colorsys.py"))
    fed = FederationConfig(train_seq_len=32, train_heldout_fraction=0.3, data_seed=4)
    data = load_text_data(folder, tokenizer, seq_len=32, heldout_fraction=0.3, seed=4)
    for heldout, full in ((False, data.train), (True, data.heldout)):
        for count in (1, 5, 40, len(full) + 5, None):
            got = first_chunks(folder, tokenizer, fed, count, heldout=heldout)
            assert got.shape == full[:count].shape and (got == full[:count]).all()


def test_a_misrouted_chunk_is_shown_as_one_bounded_line():
    from seqr.sim.registry_eval import text_start

    assert text_start("def f():\n\n    return  1\t# x") == "def f(): return 1 # x"
    long = text_start("word " * 100, length=20)
    assert len(long) == 20 and long.endswith("…") and "\n" not in long
