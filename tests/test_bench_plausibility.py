"""The plausibility benchmark on the tiny model: honest adapters pass the server's default
bounds, every gross and careful liar is refused, and --trained reuses B matrices exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from tiny import copy_texts, tiny_model_dir

from seqr.sim.bench_plausibility import main

DOMAINS = {
    "a": ("bisect.py", "heapq.py"),
    "b": ("textwrap.py", "string.py"),
    "c": ("colorsys.py", "keyword.py"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[type-arg]
    root = tmp_path_factory.mktemp("plausibility")
    for name, files in DOMAINS.items():
        copy_texts(root / "domains" / name, files)
    argv = ["--base-model", str(tiny_model_dir()), "--data", str(root / "domains"), "--steps", "3",
            "--out", str(root / "out")]  # fmt: skip
    assert main(argv) == 0
    return json.loads((root / "out" / "plausibility.json").read_text()), root


def test_honest_adapters_pass_and_gross_and_careful_liars_are_refused(run) -> None:  # type: ignore[no-untyped-def]
    result, _ = run
    assert result["false_rejection"] == {"refused": 0, "of": 3, "rate": 0.0, "names": []}
    for lie in ("gross", "careful"):
        assert result["detection"][lie] == {"refused": 3, "of": 3, "rate": 1.0}
        assert {v["reason"] for v in result["lies"][lie].values()} == {"implausible_stats"}
    assert result["detection"]["swap"]["of"] == 3


def test_trained_adapters_are_recalibrated_with_their_b_unchanged(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, root = run
    argv = ["--base-model", str(tiny_model_dir()), "--data", str(root / "domains"),
            "--domains", "a", "b", "--trained", str(root / "out" / "exports"),
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    for domain in ("a", "b"):
        before = load_file(root / "out" / "exports" / domain / "adapter_model.safetensors")
        after = load_file(tmp_path / "exports" / domain / "adapter_model.safetensors")
        assert before.keys() == after.keys()
        assert all((before[k] == after[k]).all() for k in before)
        manifest = json.loads((tmp_path / "exports" / domain / "manifest.json").read_text())
        assert manifest["name"] == domain  # signed anew by this run's own key
        assert (tmp_path / "keys" / domain / "signing_key.pem").is_file()


def test_a_missing_data_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "seqr data prepare" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
