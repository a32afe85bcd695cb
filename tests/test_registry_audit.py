"""Happy paths of the registry client: audit, pull over HTTP, the CLI, and standard tools."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest
from registry_fixtures import T0, build_registry, make_export, new_key
from tuf.ngclient import Updater

from seqr.cli import main as cli
from seqr.core import signing
from seqr.core.errors import RegistryError
from seqr.registry import AuditConfig, audit_registry, pull_registry
from seqr.registry.publish import Publisher
from seqr.registry.serve import RegistryServer

LATER = T0 + timedelta(minutes=5)


def test_audit_passes_and_reports_every_adapter(tmp_path: Path) -> None:
    reg, state, key = tmp_path / "r", tmp_path / "state", new_key()
    clients = [new_key(), new_key(), new_key()]
    build_registry(reg, [key], clients).close()
    verified = audit_registry(reg, state)
    report = verified.report
    assert (report.version, report.root_version, report.threshold, report.tree_size) == (2, 1, 1, 2)
    assert report.first_use and report.trusted_state_updated and len(report.signed_by) == 1
    assert sorted(e.name for e in report.entries) == ["domain-0", "domain-1", "domain-2"]
    assert {e.client for e in report.entries} == {
        signing.fingerprint(signing.public_key_bytes(c)) for c in clients
    }
    entries = json.loads(json.dumps(report.to_json()))["entries"]
    manifests = {hashlib.sha256(a.files["manifest.json"]).hexdigest() for a in verified.adapters}
    assert {e["manifest_sha256"] for e in entries} == manifests and len(manifests) == 3
    # The consumer gets the exact verified bytes of every file.
    for adapter in verified.adapters:
        weights = adapter.files["adapter_model.safetensors"]
        assert hashlib.sha256(weights).hexdigest() == adapter.entry.adapter_sha256


def test_audit_continues_from_the_trusted_state(tmp_path: Path) -> None:
    reg, state, key, alice = tmp_path / "r", tmp_path / "state", new_key(), new_key()
    build_registry(reg, [key], [alice]).close()
    audit_registry(reg, state)
    with Publisher(reg, [key]) as pub:
        for seed in (3, 4):
            pub.stage_adapter(make_export(alice, seed=seed))
            pub.publish(now=LATER + timedelta(seconds=seed))
    report = audit_registry(reg, state).report
    assert not report.first_use and report.trusted_version_before == 2
    assert report.version == 4 and len(report.entries) == 3 and report.tree_size == 4
    again = audit_registry(reg, state).report  # nothing new: still passes
    assert again.trusted_version_before == 4 and again.version == 4


def test_audit_without_a_trusted_state_remembers_nothing(tmp_path: Path) -> None:
    reg = tmp_path / "r"
    build_registry(reg, [new_key()], [new_key()]).close()
    report = audit_registry(reg).report
    assert report.first_use and not report.trusted_state_updated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_first_use_can_pin_root_one(tmp_path: Path) -> None:
    reg = tmp_path / "r"
    build_registry(reg, [new_key()], [new_key()]).close()
    good = hashlib.sha256((reg / "metadata/1.root.json").read_bytes()).hexdigest()
    pinned = audit_registry(reg, config=AuditConfig(expected_root_sha256=good))
    assert pinned.report.root_sha256 == good
    with pytest.raises(RegistryError, match="not the pinned"):
        audit_registry(reg, config=AuditConfig(expected_root_sha256="0" * 64))


def test_audit_follows_key_rotation_and_revocation(tmp_path: Path) -> None:
    reg, state, old, new = tmp_path / "r", tmp_path / "state", new_key(), new_key()
    alice, bob = new_key(), new_key()
    build_registry(reg, [old], [alice, bob]).close()
    audit_registry(reg, state)
    with Publisher(reg, [old]) as pub:
        pub.rotate_root([signing.public_key_bytes(new)], 1, [new], now=LATER)
    with Publisher(reg, [new]) as pub:
        pub.revoke_client(signing.fingerprint(signing.public_key_bytes(alice)), "left")
        pub.publish(now=LATER + timedelta(minutes=1))
    report = audit_registry(reg, state).report
    assert report.root_version == 2 and report.version == 4 and report.revoked == 1
    assert [e.client for e in report.entries] == [
        signing.fingerprint(signing.public_key_bytes(bob))
    ]


def test_pull_over_http_downloads_only_what_is_new(tmp_path: Path) -> None:
    reg, key, alice, bob = tmp_path / "r", new_key(), new_key(), new_key()
    pub = build_registry(reg, [key], [alice])
    server = RegistryServer(reg, quiet=True).start()
    try:
        mirror = tmp_path / "mirror"
        first = pull_registry(server.url, mirror).report
        assert first.version == 2 and first.downloaded_files == 6  # registry.json + 5 files
        assert pull_registry(server.url, mirror).report.downloaded_files == 0
        pub.enrol_client(signing.public_key_bytes(bob))
        pub.stage_adapter(make_export(bob, seed=1))
        pub.publish(now=LATER)
        second = pull_registry(server.url, mirror).report
        assert second.version == 3 and len(second.entries) == 2
        assert second.downloaded_files == 6  # the new adapter's 5 files + registry.json
        # The mirror is a complete registry: audited offline with its own trusted state...
        local = audit_registry(mirror, mirror / ".seqr").report
        assert local.version == 3 and not local.first_use
        # ... and a plain python-tuf client reads it as it is.
        plain = tmp_path / "plain"
        plain.mkdir()
        updater = Updater(
            str(plain),
            server.url + "metadata/",
            str(tmp_path / "downloads"),
            server.url + "targets/",
            bootstrap=(reg / "metadata/1.root.json").read_bytes(),
        )
        updater.refresh()
        info = updater.get_targetinfo(
            f"adapters/{local.entries[0].adapter_sha256}/adapter_model.safetensors"
        )
        assert info is not None and Path(updater.download_target(info)).stat().st_size > 0
    finally:
        server.shutdown()
        pub.close()


def test_registry_serve_serves_only_the_repository(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    reg = tmp_path / "r"
    build_registry(reg, [new_key()], [new_key()]).close()
    (reg / "targets" / "link").symlink_to(tmp_path)
    server = RegistryServer(reg, quiet=True).start()
    try:
        with urllib.request.urlopen(server.url + "metadata/1.root.json") as answer:
            assert answer.read() == (reg / "metadata/1.root.json").read_bytes()
        for path in ("staging/", "metadata/", "targets/link/r/metadata/1.root.json", "../etc"):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(server.url + path)
            assert exc.value.code == 404, path
    finally:
        server.shutdown()


def test_cli_audit_prints_a_report_and_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, state = tmp_path / "r", tmp_path / "state"
    build_registry(reg, [new_key()], [new_key(), new_key()]).close()
    argv = ["registry", "audit", str(reg), "--trusted-state", str(state)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "AUDIT PASSED: 2 adapter(s)" in out and out.count("  OK  ") == 2
    assert cli.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["version"] == 2 and len(report["entries"]) == 2


def test_cli_audit_exits_one_with_the_reason_and_keeps_the_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg, state = tmp_path / "r", tmp_path / "state"
    build_registry(reg, [new_key()], [new_key()]).close()
    base = ["registry", "audit", str(reg), "--trusted-state", str(state)]
    assert cli.main(base) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    (reg / "metadata" / "timestamp.json").write_bytes(b'{"signed": {"a": 1, "a": 2}}')
    assert cli.main(base) == 1
    err = capsys.readouterr().err
    assert "AUDIT FAILED" in err and "duplicate key" in err and "left unchanged" in err
    assert "Traceback" not in err
    assert cli.main([*base, "--json"]) == 1
    failure = json.loads(capsys.readouterr().out)
    assert failure["ok"] is False and "duplicate key" in failure["error"]
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before
    assert cli.main(["registry", "audit", str(tmp_path / "missing")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_a_failed_first_pull_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror = tmp_path / "mirror"
    assert cli.main(["registry", "pull", "http://127.0.0.1:9/", str(mirror)]) == 1
    err = capsys.readouterr().err
    assert "cannot fetch it" in err and "Traceback" not in err and "HTTPConnection" not in err
    assert not mirror.exists()
