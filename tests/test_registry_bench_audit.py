"""`seqr bench audit` runs end to end on a tiny grid and writes its JSON (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from seqr.cli import main as cli


def test_bench_audit_builds_audits_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["--adapters", "5", "--per-version", "2", "--layers", "2", "--repeats", "1"]
    assert cli.main(["bench", "audit", *argv, "--out", str(out)]) == 0
    result = json.loads((out / "audit.json").read_text())
    assert result["entries"] == 5 and result["versions"] == 4  # empty v1, then 2 + 2 + 1
    assert result["adapter_bytes"] == 4 * 2 * (8 * 576 * 3 + 192 * 8)
    assert len(result["first_use_audit_seconds"]) == 1 and result["best_first_use_seconds"] > 0
    assert not (out / "registry").exists()  # removed unless --keep
