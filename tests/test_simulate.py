"""`seqr simulate` end to end on a tiny model: a real Flower run (own SuperLink, simulated
SuperNodes), the registry audited, every method evaluated and the report written."""

import json
from pathlib import Path

import pytest
from tiny import build_tiny_llama, copy_texts

from seqr.core.errors import ConfigError, DataError
from seqr.registry.audit import audit_registry
from seqr.sim.simulate import SimulateConfig, main, pick_domains

DOMAINS = {"d0": ("bisect.py", "heapq.py"), "d1": ("textwrap.py",), "d2": ("colorsys.py",)}


def tiny_world(tmp_path: Path) -> tuple[Path, Path]:
    model = build_tiny_llama(tmp_path / "model")
    for name, files in DOMAINS.items():
        copy_texts(tmp_path / "data" / name, files)
    return model, tmp_path / "data"


@pytest.mark.flower
def test_quick_simulation_publishes_an_audited_registry_and_a_report(tmp_path):
    model, data = tiny_world(tmp_path)
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--base-model", str(model), "--quick",
            "--steps", "3", "--seq-len", "32"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(e.name for e in audit_registry(out / "registry").report.entries) == sorted(
        DOMAINS
    )
    report = json.loads((out / "report.json").read_text())
    methods = report["evaluation"]["methods"]
    for name in ("seqr", "seqr_raw", "spectr", "brute_force", "arrow", "peft_arrow", "random"):
        assert 0.0 <= methods[name]["routing_accuracy"] <= 1.0
    for name in ("oracle", "seqr", "base", "uniform_merge", "seqr_per_token"):
        assert methods[name]["heldout_loss"] > 0
    assert report["evaluation"]["agreement_seqr_brute_force"] == 1.0
    assert report["run"]["clients"] == 3
    for plot in ("confusion_seqr.png", "accuracy.png", "loss.png", "routing_time.png"):
        assert (out / plot).stat().st_size > 5_000
    # A second run into the same folder never overwrites the registry; evaluation can be rerun.
    assert main(argv) == 2
    assert main([*argv, "--evaluate-only"]) == 0
    assert json.loads((out / "report.json").read_text())["audit"]["entries"] == 3


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
