"""`seqr bench serve` end to end on the tiny registry: a real `seqr serve` process, the openai
client at two concurrency levels, named adapter vs auto on the same held-out prompts; the JSON,
Markdown and PNG it writes hold what the report claims (no speed is asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _route_world import DOMAINS, write_domain
from _serve_world import serve_world

from seqr.consumer.serve.bench import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_bench_serve_compares_auto_with_the_named_adapter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = serve_world()
    for domain in DOMAINS:
        write_domain(tmp_path / "data" / domain, domain)
    out = tmp_path / "bench"
    code = main(
        [
            "--registry",
            str(world.registry),
            "--data",
            str(tmp_path / "data"),
            "--base-model",
            str(world.model_dir),
            "--clients",
            "1,3",
            "--requests-per-client",
            "2",
            "--min-requests",
            "4",
            "--max-tokens",
            "3",
            "--prompt-tokens",
            "24",
            "--repeats",
            "2",
            "--routing-pass",
            "bfloat16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    doc = json.loads((out / "bench_serve.json").read_text())
    assert list(doc["levels"]) == ["1", "3"] and doc["lost_requests"] == 0
    assert doc["server_exit_code"] == 0 and sorted(doc["adapters"]) == sorted(DOMAINS)
    assert doc["registry_load_seconds"] > 0
    assert doc["config"]["routing_pass"] == "bfloat16"
    for level in doc["levels"].values():
        for mode in ("fixed", "auto"):
            stats = level[mode]
            count = 2 * max(4, 2 * level["clients"])  # 2 repeats of max(min, 2 per client)
            assert stats["requests"] == count and stats["lost"] == 0
            assert stats["tokens"] == count * 3  # ignore_eos: exactly max_tokens each
            assert stats["tokens_per_s"] > 0
            assert 0 < stats["latency_p50_s"] <= stats["latency_p99_s"]
        assert level["fixed"]["routed_to_domain"] == 1.0  # the named adapter is the domain's
        assert 0.0 <= level["auto"]["routed_to_domain"] <= 1.0
        ratio = level["auto"]["tokens_per_s"] / level["fixed"]["tokens_per_s"]
        assert level["throughput_ratio"] == pytest.approx(ratio)
        cpu = [level[m]["tokens_per_server_cpu_s"] for m in ("auto", "fixed")]
        assert cpu[1] > 0 and level["cpu_ratio"] == pytest.approx(cpu[0] / cpu[1])
    assert (out / "bench_serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "bench_serve.md").read_text()
    assert table.startswith("| clients |") and table.count("\n") == 4
    assert "the target" in capsys.readouterr().out
