"""`seqr server init / enrol / revoke` through the real dispatcher, checked by the audit."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import tiny_model_dir

from seqr.cli.main import main
from seqr.core import key_files
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
from seqr.operator.settings import state_dir_for
from seqr.registry.audit import audit_registry
from seqr.registry.config import AuditConfig


def test_init_enrol_revoke_publish_versions_an_auditor_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_files.write_keypair(tmp_path / "server-key")
    fp_a = key_files.write_keypair(tmp_path / "client-a")
    fp_b = key_files.write_keypair(tmp_path / "client-b")
    fed = tmp_path / "federation.toml"
    fed.write_text(f'[federation]\nbase-model = "{tiny_model_dir()}"\nlora-rank = 4\n')
    registry = tmp_path / "registry"
    common = ["--registry", str(registry), "--key", str(tmp_path / "server-key")]

    assert main(["server", "init", *common, "--federation", str(fed)]) == 0
    root = capsys.readouterr().out.split("root sha256: ")[1].split()[0]
    assert state_dir_for(registry).is_dir()
    pinned = audit_registry(registry, config=AuditConfig(expected_root_sha256=root)).report
    assert pinned.version == 1

    hex_b = (tmp_path / "client-b" / PUBLIC_KEY_NAME).read_text().strip()
    client_a = str(tmp_path / "client-a" / PUBLIC_KEY_NAME)
    assert main(["server", "enrol", *common, "--client", client_a, "--client", hex_b]) == 0
    assert f"enrolled {fp_a}, {fp_b}; published version 2" in capsys.readouterr().out
    # --key names the key folder or the key file itself, as in `seqr client train`.
    as_file = [
        "--registry",
        str(registry),
        "--key",
        str(tmp_path / "server-key" / PRIVATE_KEY_NAME),
    ]
    assert main(["server", "revoke", *as_file, "--client", fp_a, "--reason", "key leaked"]) == 0
    assert "published version 3" in capsys.readouterr().out

    report = audit_registry(registry).report
    assert (report.version, report.clients, report.revoked) == (3, 1, 1)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_errors_name_the_fix_exit_1_and_leave_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ["--registry", str(tmp_path / "registry")]
    assert main(["server", "init", *registry, "--key", str(tmp_path / "nokey")]) == 1
    assert "seqr keys generate --out" in capsys.readouterr().err
    assert not (tmp_path / "registry").exists()
    key_files.write_keypair(tmp_path / "server-key")
    key_files.write_keypair(tmp_path / "client")
    client = ["--client", str(tmp_path / "client" / PUBLIC_KEY_NAME)]
    key = ["--key", str(tmp_path / "server-key")]
    assert main(["server", "enrol", *registry, *key, *client]) == 1
    assert "not a registry" in capsys.readouterr().err
    assert main(["server", "init", *registry, *key]) == 0
    capsys.readouterr()
    before = _tree(tmp_path / "registry")
    assert main(["server", "enrol", *registry, *key, "--client", "abc"]) == 2
    assert "--client value is neither PEM" in capsys.readouterr().err
    # A wrong server key is refused before anything is staged (hardening: an unauthorised
    # enrolment must never be published by the operator's next legitimate command).
    key_files.write_keypair(tmp_path / "wrong-key")
    wrong = ["--key", str(tmp_path / "wrong-key")]
    assert main(["server", "enrol", *registry, *wrong, *client]) == 1
    assert "not one of the keys" in capsys.readouterr().err
    assert _tree(tmp_path / "registry") == before
    assert main(["server", "enrol", *registry, *key, *client]) == 0
    assert "published version 2" in capsys.readouterr().out
    after = _tree(tmp_path / "registry")
    assert main(["server", "enrol", *registry, *key, *client]) == 0  # enrolled already
    assert "nothing published" in capsys.readouterr().out
    assert _tree(tmp_path / "registry") == after
    assert main(["server", "init", *registry, *key]) == 1  # never overwrites a registry
    assert "not an empty folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["server", "init", "--registry", str(tmp_path / "busy"), *key]) == 1
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["server", "init", "--registry", str(tmp_path / "r2"), *key, "--adapter-dtype", "F99"])
    assert exc.value.code == 2 and "F99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(
            ["server", "init", "--registry", str(tmp_path / "r2"), *key, "--adapter-dtype", "BF16"]
        )
    assert exc.value.code == 2 and "--federation" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
