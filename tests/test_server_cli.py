"""`seqr server init / enrol / revoke` through the real dispatcher, checked by the audit."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import tiny_model_dir

from seqr.cli.main import main
from seqr.core import signing
from seqr.core.signing import PUBLIC_KEY_NAME
from seqr.operator.settings import state_dir_for
from seqr.registry.audit import audit_registry
from seqr.registry.config import AuditConfig


def test_init_enrol_revoke_publish_versions_an_auditor_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    signing.write_keypair(tmp_path / "server-key")
    fp_a = signing.write_keypair(tmp_path / "client-a")
    fp_b = signing.write_keypair(tmp_path / "client-b")
    fed = tmp_path / "federation.toml"
    fed.write_text(f'[federation]\nbase-model = "{tiny_model_dir()}"\nlora-rank = 4\n')
    registry = tmp_path / "registry"
    common = ["--registry", str(registry), "--key", str(tmp_path / "server-key")]

    assert main(["server", "init", *common, "--federation", str(fed)]) == 0
    root = capsys.readouterr().out.split("root sha256: ")[1].split()[0]
    assert state_dir_for(registry).is_dir()
    pinned = audit_registry(registry, config=AuditConfig(expected_root_sha256=root))
    assert pinned.version == 1

    hex_b = (tmp_path / "client-b" / PUBLIC_KEY_NAME).read_text().strip()
    client_a = str(tmp_path / "client-a" / PUBLIC_KEY_NAME)
    assert main(["server", "enrol", *common, "--client", client_a, "--client", hex_b]) == 0
    assert f"enrolled {fp_a}, {fp_b}; published version 2" in capsys.readouterr().out
    assert main(["server", "revoke", *common, "--client", fp_a, "--reason", "key leaked"]) == 0
    assert "published version 3" in capsys.readouterr().out

    report = audit_registry(registry)
    assert (report.version, report.clients, report.revoked) == (3, 1, 1)


def test_errors_name_the_fix_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = ["--registry", str(tmp_path / "registry")]
    assert main(["server", "init", *registry, "--key", str(tmp_path / "nokey")]) == 2
    assert "seqr keys generate --out" in capsys.readouterr().err
    signing.write_keypair(tmp_path / "server-key")
    key = ["--key", str(tmp_path / "server-key")]
    assert main(["server", "enrol", *registry, *key, "--client", "abc"]) == 2
    assert "not a registry" in capsys.readouterr().err
    assert main(["server", "init", *registry, *key]) == 0
    capsys.readouterr()
    assert main(["server", "enrol", *registry, *key, "--client", "abc"]) == 2
    assert "--client value is neither PEM" in capsys.readouterr().err
    assert main(["server", "init", *registry, *key]) == 2  # never overwrites a registry
    assert "not empty" in capsys.readouterr().err
