"""`seqr bench device`: the harness that compares routing on a GPU with the CPU counts what
it claims. Here it runs CPU against CPU on the tiny model (CI has no GPU); the GPU run and its
numbers are in docs/RESULTS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqr.consumer.config import RouterConfig
from seqr.consumer.serve.config import EngineConfig
from seqr.core.errors import ConfigError
from seqr.sim.bench_device import DeviceBenchConfig, differences, main
from seqr.sim.bench_generation import GenerationBenchConfig
from seqr.sim.bench_routing import RoutingBenchConfig, choice_agreement


def test_every_check_runs_and_agrees_when_both_sides_are_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--device", "cpu", "--base-model", "tiny", "--tokens", "256", "--new-tokens", "3",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((tmp_path / "device.json").read_text())
    assert doc["differences"] == []
    assert {row["method"] for row in doc["routers"]} == {"seqr", "spectr", "arrow", "brute_force"}
    for row in doc["routers"]:
        assert row["vs_cpu"]["identical"] == row["vs_cpu"]["rows"] == 256
        if row["method"] != "arrow":  # ARROW is a proxy, not the norm
            assert row["max_rel_norm_error"] < 1e-5
    model = doc["model"]
    assert model["adapters_chosen_on_cpu"] >= 2  # the batch really mixes adapters
    for key in ("per_sequence_fp32", "per_sequence_bf16", "query_statistics",
                "per_token_next_token"):  # fmt: skip
        assert model[key]["identical"] == model[key]["rows"] > 0
    assert model["generation"]["identical"] == model["generation"]["tokens"] == 8 * 3
    assert "choices differ beyond ties: none" in capsys.readouterr().out


def test_agreement_counts_a_real_difference_but_not_a_float32_tie() -> None:
    scores = torch.tensor([[1.0, 2.0, 0.0], [3.0, 3.0 - 1e-7, 0.0], [5.0, 1.0, 0.0]])
    result = choice_agreement(scores, torch.tensor([1, 1, 1]))
    # row 0 agrees, row 1 is a tie within float32 rounding, row 2 really differs
    assert result == {"rows": 3, "identical": 1, "differ_beyond_ties": 1}


def test_a_differing_choice_is_named_in_the_differences() -> None:
    result = {
        "routers": [
            {
                "method": "seqr",
                "input": "bfloat16",
                "vs_cpu": {"differ_beyond_ties": 0},
                "vs_float64_brute_force": {"differ_beyond_ties": 2},
            }
        ],
        "model": {"model": "tiny", "query_statistics": {"differ_beyond_ties": 1}},
    }
    assert differences(result) == [
        "seqr (bfloat16 input) vs_float64_brute_force",
        "query_statistics",
    ]


@pytest.mark.parametrize(
    "config",
    [DeviceBenchConfig, RoutingBenchConfig, GenerationBenchConfig, RouterConfig, EngineConfig],
)
@pytest.mark.parametrize("device", ["cuda:99", "nosuchdevice"])  # no machine has a 100th GPU
def test_a_device_this_machine_lacks_is_refused_by_name(config: type, device: str) -> None:
    with pytest.raises(ConfigError, match=f"{config.__name__}.device = '{device}' is not usable"):
        config(device=device)


def test_the_bench_without_a_gpu_says_so_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda:99"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "DeviceBenchConfig.device = 'cuda:99' is not usable on this machine" in err
    assert "Traceback" not in err and "Error:" not in err


def test_the_device_bench_config_names_a_bad_field() -> None:
    with pytest.raises(ConfigError, match="DeviceBenchConfig.pool"):
        DeviceBenchConfig(device="cpu", pool=0)


def test_a_config_json_gives_that_architecture_with_seeded_random_weights(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from seqr.sim.synthetic_library import base_model_for

    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)  # fmt: skip
    spec = DeviceBenchConfig(device="cpu", base_model=str(tmp_path / "config.json"), seed=3)
    (first, name), (second, _) = base_model_for(spec), base_model_for(spec)
    assert name == "random weights, config.json"
    assert first.config.num_hidden_layers == 3 and first.config.vocab_size == 300
    pairs = zip(first.parameters(), second.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
