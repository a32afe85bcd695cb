"""Happy paths of ``audit_registry`` and ``seqr registry audit``; the pure core over bytes."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest
from registry_fixtures import T0, build_registry, make_export, new_key

from seqr.cli import main as cli
from seqr.core import signing
from seqr.core.errors import RegistryError, SignatureError
from seqr.registry.audit import audit_registry, read_registry_files
from seqr.registry.config import AuditConfig
from seqr.registry.publish import Publisher
from seqr.registry.trusted_state import load_trusted_state
from seqr.registry.verify import RegistryFiles, verify_metadata

NOW = T0 + timedelta(hours=2)


def test_audit_passes_and_reports_every_entry(tmp_path: Path) -> None:
    reg, state, key = tmp_path / "r", tmp_path / "s.json", new_key()
    clients = [new_key(), new_key(), new_key()]
    build_registry(reg, [key], clients).close()
    report = audit_registry(reg, state, NOW)
    assert (report.version, report.root_version, report.threshold, report.tree_size) == (2, 1, 1, 2)
    assert report.first_use and report.trusted_state_updated
    assert report.signed_by == (signing.fingerprint(signing.public_key_bytes(key)),)
    assert sorted(e.name for e in report.entries) == ["domain-0", "domain-1", "domain-2"]
    assert {e.client for e in report.entries} == {
        signing.fingerprint(signing.public_key_bytes(c)) for c in clients
    }
    saved = load_trusted_state(state)
    assert saved is not None and saved.registry_version == 2 and saved.tree_root == report.tree_root
    entries = json.loads(json.dumps(report.to_json()))["entries"]
    assert all(e["ok"] for e in entries)
    stored = {hashlib.sha256(p.read_bytes()).hexdigest() for p in reg.rglob("manifest.json")}
    assert {e["manifest_sha256"] for e in entries} == stored and len(stored) == 3


def test_audit_continues_from_the_trusted_state(tmp_path: Path) -> None:
    reg, state, key, alice = tmp_path / "r", tmp_path / "s.json", new_key(), new_key()
    build_registry(reg, [key], [alice]).close()
    audit_registry(reg, state, NOW)
    with Publisher(reg, [key]) as pub:
        for seed in (3, 4):
            pub.stage_adapter(make_export(alice, seed=seed))
            pub.publish(now=T0 + timedelta(hours=1, minutes=seed))
    report = audit_registry(reg, state, NOW)
    assert not report.first_use and report.trusted_version_before == 2
    assert report.version == 4 and len(report.entries) == 3
    again = audit_registry(reg, state, NOW)  # nothing new: still passes
    assert again.trusted_version_before == 4 and again.version == 4


def test_audit_without_a_state_file_remembers_nothing(tmp_path: Path) -> None:
    reg = tmp_path / "r"
    build_registry(reg, [new_key()], [new_key()]).close()
    report = audit_registry(reg, None, NOW)
    assert report.first_use and not report.trusted_state_updated
    assert not any(p.name.endswith(".json") for p in tmp_path.iterdir() if p.is_file())


def test_first_use_can_pin_root_one(tmp_path: Path) -> None:
    reg = tmp_path / "r"
    build_registry(reg, [new_key()], [new_key()]).close()
    good = hashlib.sha256((reg / "root/1.root.json").read_bytes()).hexdigest()
    assert audit_registry(reg, None, NOW, config=AuditConfig(expected_root_sha256=good)).version
    with pytest.raises(RegistryError, match="not the pinned"):
        audit_registry(reg, None, NOW, config=AuditConfig(expected_root_sha256="0" * 64))


def test_audit_follows_key_rotation_and_revocation(tmp_path: Path) -> None:
    reg, state, old, new = tmp_path / "r", tmp_path / "s.json", new_key(), new_key()
    alice, bob = new_key(), new_key()
    build_registry(reg, [old], [alice, bob]).close()
    audit_registry(reg, state, NOW)
    later = T0 + timedelta(hours=1)
    with Publisher(reg, [old]) as pub:
        pub.rotate_root([signing.public_key_bytes(new)], 1, [new], now=later)
    with Publisher(reg, [new]) as pub:
        pub.revoke_client(signing.fingerprint(signing.public_key_bytes(alice)), "left")
        pub.publish(now=later + timedelta(minutes=1))
    report = audit_registry(reg, state, NOW)
    assert report.root_version == 2 and report.version == 4 and report.revoked == 1
    assert [e.client for e in report.entries] == [
        signing.fingerprint(signing.public_key_bytes(bob))
    ]


def test_verification_core_is_pure_over_bytes(tmp_path: Path) -> None:
    reg = tmp_path / "r"
    build_registry(reg, [new_key()], [new_key()]).close()
    files = read_registry_files(reg, AuditConfig())
    assert verify_metadata(files, None, NOW).metadata.version == 2
    envelope = json.loads(files.metadata[-1])
    sig = envelope["signatures"][0]["sig"]
    envelope["signatures"][0]["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]
    tampered = RegistryFiles(
        files.pointer,
        files.roots,
        [files.metadata[0], json.dumps(envelope).encode()],
        files.tree_head,
    )
    with pytest.raises(SignatureError, match="signed by 0/1"):
        verify_metadata(tampered, None, NOW)


def test_cli_prints_a_report_and_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, state = tmp_path / "r", tmp_path / "s.json"
    build_registry(reg, [new_key()], [new_key(), new_key()]).close()
    argv = [
        "registry",
        "audit",
        str(reg),
        "--trusted-state",
        str(state),
        "--now",
        "2025-06-01T14:00:00Z",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "AUDIT PASSED: 2 adapter(s)" in out and out.count("  OK  ") == 2
    assert cli.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["version"] == 2 and len(report["entries"]) == 2


def test_cli_exits_nonzero_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, state = tmp_path / "r", tmp_path / "s.json"
    build_registry(reg, [new_key()], [new_key()]).close()
    base = ["registry", "audit", str(reg), "--trusted-state", str(state)]
    assert cli.main([*base, "--now", "2025-06-01T14:00:00Z"]) == 0
    capsys.readouterr()
    before = state.read_bytes()
    assert cli.main([*base, "--now", "2025-07-01T00:00:00Z"]) == 1  # a month later: expired
    err = capsys.readouterr().err
    assert "AUDIT FAILED (FreezeError)" in err and "left unchanged" in err
    assert cli.main([*base, "--now", "2025-07-01T00:00:00Z", "--json"]) == 1
    failure = json.loads(capsys.readouterr().out)
    assert failure == {"ok": False, "error_type": "FreezeError", "error": failure["error"]}
    assert state.read_bytes() == before
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--now", "2025-07-01 00:00"])  # no time zone: a usage error
    assert exc.value.code == 2
