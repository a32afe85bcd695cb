"""FederationConfig: one validated config, read from TOML and from a Flower run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqr.core.errors import ConfigError
from seqr.core.federation import ALL_LINEAR, FederationConfig


def test_defaults_match_the_paper_setup() -> None:
    fed = FederationConfig()
    assert (fed.lora_rank, fed.lora_alpha) == (8, 16)
    assert fed.lora_target_modules == ALL_LINEAR and "down_proj" in ALL_LINEAR
    assert fed.base_model == "SmolLM2-135M-Instruct"


def test_run_config_round_trip_is_exact() -> None:
    fed = FederationConfig(lora_rank=4, lora_target_modules=("q_proj", "k_proj"), calib_dp=True)
    rc = fed.to_run_config()
    assert rc["lora-rank"] == 4
    assert rc["lora-target-modules"] == "q_proj,k_proj"
    assert all(isinstance(v, bool | int | float | str) for v in rc.values())
    assert set(rc) == set(FederationConfig.keys())
    assert FederationConfig.from_run_config(rc) == fed
    assert FederationConfig.from_run_config(rc).fingerprint() == fed.fingerprint()


def test_from_toml_flat_and_table(tmp_path: Path) -> None:
    flat = tmp_path / "flat.toml"
    flat.write_text('lora-rank = 4\nlora-target-modules = ["q_proj"]\ntrain-lr = 1\n')
    fed = FederationConfig.from_toml(flat)
    assert fed.lora_rank == 4 and fed.lora_target_modules == ("q_proj",)
    assert isinstance(fed.train_lr, float) and fed.train_lr == 1.0
    table = tmp_path / "table.toml"
    table.write_text("[federation]\na-seed = 7\n")
    assert FederationConfig.from_toml(table).a_seed == 7


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"lora-rank": 0}, ["lora-rank", "0"]),
        ({"lora-rank": 8.5}, ["lora-rank", "8.5"]),
        ({"lora-rank": True}, ["lora-rank", "True"]),
        ({"lora-alpha": -1}, ["lora-alpha", "-1"]),
        ({"lora-target-modules": ""}, ["lora-target-modules"]),
        ({"lora-target-modules": "q_proj,q_proj"}, ["lora-target-modules", "duplicates"]),
        ({"lora-target-modules": "q proj"}, ["lora-target-modules", "q proj"]),
        ({"a-seed": -3}, ["a-seed", "-3"]),
        ({"a-sha256": "abc"}, ["a-sha256", "abc"]),
        ({"base-model-sha256": "Z" * 64}, ["base-model-sha256"]),
        ({"calib-dp-epsilon": 0.0}, ["calib-dp-epsilon", "0.0"]),
        ({"calib-dp-delta": 0.5}, ["calib-dp-delta", "0.5"]),
        ({"calib-dp-clip": float("inf")}, ["calib-dp-clip", "inf"]),
        ({"calib-dp": "yes"}, ["calib-dp", "yes"]),
        ({"train-lr": float("nan")}, ["train-lr", "nan"]),
        ({"train-seq-len": 4}, ["train-seq-len", "4"]),
        ({"train-batch-size": 0}, ["train-batch-size", "0"]),
        ({"train-heldout-fraction": 0.95}, ["train-heldout-fraction", "0.95"]),
    ],
)
def test_out_of_range_value_rejected_naming_key_and_value(
    changes: dict[str, object], names: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        FederationConfig.from_run_config(changes)
    for name in names:
        assert name in str(info.value)


def test_unknown_key_rejected_unless_ignored() -> None:
    with pytest.raises(ConfigError, match="lora-rnak"):
        FederationConfig.from_run_config({"lora-rnak": 8})
    fed = FederationConfig.from_run_config({"registry-dir": "x", "a-seed": 3}, ignore_unknown=True)
    assert fed.a_seed == 3


def test_toml_errors_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        FederationConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lora-rank = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        FederationConfig.from_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour") as info:
        FederationConfig.from_toml(unknown)
    assert "unknown.toml" in str(info.value)


def test_token_budget_sets_steps() -> None:
    fed = FederationConfig(train_steps=5, train_tokens=10_000, train_batch_size=4, train_seq_len=64)
    assert fed.steps == 40  # ceil(10000 / 256)
    assert FederationConfig(train_steps=5).steps == 5


def test_frozen() -> None:
    fed = FederationConfig()
    with pytest.raises(AttributeError):
        fed.lora_rank = 4  # type: ignore[misc]
    with pytest.raises(ConfigError, match="lora-rank"):
        fed.replace(lora_rank=1000)
