"""`seqr bench generation` on the tiny model: the routed and the fixed-adapter runs do the same
work (identical tokens) on a batch that really mixes adapters, and the JSON holds the ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqr.core.errors import ConfigError
from seqr.sim.bench_generation import GenerationBenchConfig, main


def test_routed_and_fixed_generation_match_on_a_mixed_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--base-model", "tiny", "--new-tokens", "2", "3", "--repeats", "1", "--batch", "4",
            "--adapters", "4", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((tmp_path / "generation.json").read_text())
    assert doc["library"] == "synthetic" and doc["adapters"] == 4
    assert [row["new_tokens"] for row in doc["results"]] == [2, 3]
    for row in doc["results"]:
        assert row["adapters_in_batch"] >= 2
        for key in ("fp32", "bf16"):  # first pass on the model itself and on a bf16 copy
            assert row[key]["identical_tokens"]
            assert row[key]["ratio"] > 0 and row[key]["routing_pass_share"] > 0
            assert row[key]["overhead"] >= 1 + row[key]["routing_pass_share"]
        assert len(row["cpu_seconds"]["fixed"]) == len(row["wall_seconds"]["routed_bf16"]) == 1
    assert "routed/fixed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"adapters": 1}, "adapters"), ({"new_tokens": ()}, "new_tokens"),
     ({"new_tokens": (0,)}, "new_tokens"), ({"threads": -1}, "threads"),
     ({"batch": True}, "batch")],
)  # fmt: skip
def test_bench_config_names_the_bad_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"GenerationBenchConfig.{field}"):
        GenerationBenchConfig(**changes)  # type: ignore[arg-type]
