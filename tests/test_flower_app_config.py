"""`flwr run .` works from the repository: pyproject declares every run-config key the apps read."""

import tomllib
from pathlib import Path

from seqr.sim.flower_local import run_config_defaults

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_run_config_key_with_its_default():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert declared["components"] == {
        "serverapp": "seqr.operator.server_app:app",
        "clientapp": "seqr.node.client_app:app",
    }
    assert declared["config"] == run_config_defaults()
