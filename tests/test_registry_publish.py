"""The publisher: a TUF repository with consistent snapshots, durable staging, roll-forward,
rotation, and keys checked before anything changes."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from registry_fixtures import (
    FEDERATION,
    T0,
    build_registry,
    make_export,
    make_stats,
    make_tensors,
    new_key,
)

from seqr.core import signing
from seqr.core.errors import AdmissionError, KeyFileError, RegistryError, SignatureError
from seqr.registry import PublisherConfig, audit_registry, layout, merkle, repository, store
from seqr.registry.publish import Publisher

LATER = T0 + timedelta(minutes=5)


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_create_writes_a_complete_tuf_repository(tmp_path: Path) -> None:
    key = new_key()
    Publisher.create(tmp_path / "reg", [key], now=T0).close()
    reg = tmp_path / "reg"
    for rel in ("1.root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"):
        assert (reg / "metadata" / rel).is_file(), rel
    root = json.loads((reg / "metadata" / "1.root.json").read_bytes())["signed"]
    assert root["consistent_snapshot"] is True
    assert set(root["roles"]) == {"root", "targets", "snapshot", "timestamp"}
    assert audit_registry(reg).report.version == 1
    with pytest.raises(RegistryError, match="not an empty folder"):
        Publisher.create(reg, [key], now=T0)


def test_failed_create_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "reg"
    with pytest.raises(RegistryError, match="threshold"):
        Publisher.create(target, [new_key()], threshold=2, now=T0)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_every_targets_version_is_a_leaf_of_the_signed_log(tmp_path: Path) -> None:
    reg, key, clients = tmp_path / "reg", new_key(), [new_key(), new_key()]
    with build_registry(reg, [key], clients) as pub:
        pub.stage_adapter(make_export(clients[0], seed=5))
        result = pub.publish(now=LATER)
    assert result.version == 3 and result.entries == 3 and len(result.added) == 1
    leaves = [
        merkle.leaf_hash((reg / "metadata" / f"{v}.targets.json").read_bytes()) for v in (1, 2, 3)
    ]
    assert result.tree_root == merkle.root_hash(leaves).hex() and result.tree_size == 3
    snapshot = json.loads((reg / "metadata" / "3.snapshot.json").read_bytes())["signed"]
    assert snapshot[layout.LOG_FIELD]["root_hash"] == result.tree_root
    assert audit_registry(reg).report.tree_size == 3


def test_refresh_without_changes_signs_only_a_new_timestamp(tmp_path: Path) -> None:
    reg, key = tmp_path / "reg", new_key()
    with build_registry(reg, [key], [new_key()]) as pub:
        before = pub.committed()
        result = pub.publish(now=LATER)
        after = pub.committed()
    assert result.version == 2 and after.snapshot.signed.version == before.snapshot.signed.version
    assert after.timestamp.signed.version == before.timestamp.signed.version + 1
    assert after.timestamp.signed.expires > before.timestamp.signed.expires


def test_stage_adapter_refuses_unknown_revoked_and_duplicate(tmp_path: Path) -> None:
    reg, key, alice, mallory = tmp_path / "reg", new_key(), new_key(), new_key()
    with build_registry(reg, [key], [alice]) as pub:
        with pytest.raises(AdmissionError, match="unknown_client"):
            pub.stage_adapter(make_export(mallory, seed=5))
        same_weights_other_stats = make_export(alice, seed=0, stats=make_stats(9.0))
        with pytest.raises(AdmissionError, match="duplicate_adapter"):
            pub.stage_adapter(same_weights_other_stats)
        stored = dict(audit_registry(reg).adapters[0].files)  # what a retried round resends
        assert pub.stage_adapter(stored) is not None  # the same export again: a no-op
        assert pub.pending == 0
        pub.revoke_client(signing.fingerprint(signing.public_key_bytes(alice)), "leaked key")
        with pytest.raises(AdmissionError, match="revoked_client"):
            pub.stage_adapter(make_export(alice, seed=9))
        assert pub.publish(now=LATER).entries == 0


def test_stage_adapter_runs_the_auditors_checks(tmp_path: Path) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    with build_registry(reg, [key], [alice]) as pub:
        tampered = make_export(alice, seed=3)
        tampered["norm_stats.json"] = make_stats(mean=0.1, std=0.01)  # lying statistics
        with pytest.raises(SignatureError):
            pub.stage_adapter(tampered)
        tensors = make_tensors(4)
        next(iter(tensors.values()))[0, 0] = np.nan
        with pytest.raises(RegistryError, match="NaN"):
            pub.stage_adapter(make_export(alice, tensors=tensors))
        assert pub.pending == 0


def test_auto_enrol_admits_new_client_keys(tmp_path: Path) -> None:
    reg, key, bob = tmp_path / "reg", new_key(), new_key()
    config = PublisherConfig(federation=FEDERATION, auto_enrol=True)
    with build_registry(reg, [key], [], config=config) as pub:
        pub.stage_adapter(make_export(bob, seed=1))
        assert pub.publish(now=LATER).entries == 1
        assert signing.fingerprint(signing.public_key_bytes(bob)) in pub.document.clients


def test_revocation_removes_the_clients_adapters_for_good(tmp_path: Path) -> None:
    reg, key, alice, bob = tmp_path / "reg", new_key(), new_key(), new_key()
    alice_id = signing.fingerprint(signing.public_key_bytes(alice))
    with build_registry(reg, [key], [alice, bob]) as pub:
        pub.revoke_client(alice_id, "key leaked")
        result = pub.publish(now=LATER)
        assert result.entries == 1 and len(result.removed) == 1
        with pytest.raises(AdmissionError, match="revoked"):
            pub.enrol_client(signing.public_key_bytes(alice))
        document = pub.document
    assert alice_id in document.revoked and alice_id not in document.clients
    assert [e.name for e in audit_registry(reg).report.entries] == ["domain-1"]


def test_enrolling_an_enrolled_key_stages_nothing(tmp_path: Path) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    with build_registry(reg, [key], [alice]) as pub:
        pub.enrol_client(signing.public_key_bytes(alice))
        assert pub.pending == 0


def test_staged_adapters_survive_a_restart(tmp_path: Path) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    build_registry(reg, [key], [alice]).close()
    with Publisher(reg, [key]) as pub:
        sha = pub.stage_adapter(make_export(alice, seed=7))
    with Publisher(reg, [key]) as pub:  # "the server restarted"
        result = pub.publish(now=LATER)
        assert pub.pending == 0
    assert sha in result.added


@pytest.mark.parametrize("stop_before", ["snapshot", "timestamp"])
def test_restart_rolls_forward_a_publish_stopped_before_its_commit_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_before: str
) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    build_registry(reg, [key], [alice]).close()
    real_write = repository.write_role

    def crash(path: Path, root, signers, signed):  # type: ignore[no-untyped-def]
        if signed.type == stop_before:
            raise KeyboardInterrupt(f"simulated crash before the {stop_before}")
        return real_write(path, root, signers, signed)

    pub = Publisher(reg, [key])
    sha = pub.stage_adapter(make_export(alice, seed=8))
    monkeypatch.setattr(repository, "write_role", crash)
    with pytest.raises(KeyboardInterrupt):
        pub.publish(now=LATER)
    pub.close()
    monkeypatch.setattr(repository, "write_role", real_write)
    assert audit_registry(reg).report.version == 2  # readers still see version 2 complete
    signed = (reg / "metadata" / "3.targets.json").read_bytes()
    with Publisher(reg, [key]) as pub:  # rolled forward, not re-signed
        assert pub.version == 3 and sha in pub.committed().state.adapters
        assert pub.pending == 1  # applied already: the next publish only clears it
        pub.publish(now=LATER)
        assert pub.version == 3 and pub.pending == 0
    assert (reg / "metadata" / "3.targets.json").read_bytes() == signed
    assert audit_registry(reg).report.version == 3


def test_a_full_disk_mid_publish_does_not_wedge_the_publisher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hardening: after ENOSPC the same Publisher object publishes on the next try."""
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    pub = build_registry(reg, [key], [alice])
    sha = pub.stage_adapter(make_export(alice, seed=9))
    real_write = store.write_file

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_file", full_disk)  # timestamp.json cannot be replaced
    with pytest.raises(OSError, match="No space"):
        pub.publish(now=LATER)
    monkeypatch.setattr(store, "write_file", real_write)
    result = pub.publish(now=LATER)
    assert sha in pub.committed().state.adapters and result.version == 3
    pub.close()
    assert audit_registry(reg).report.version == 3


def test_only_one_publisher_at_a_time_even_without_a_lock_file(tmp_path: Path) -> None:
    reg, key = tmp_path / "reg", new_key()
    with Publisher.create(reg, [key], now=T0):
        for stray in reg.rglob("*lock*"):  # deleting any lock file must not let a second in
            stray.unlink()
        with pytest.raises(RegistryError, match="another publisher"):
            Publisher(reg, [key])


def test_wrong_or_too_few_keys_are_refused_before_anything_changes(tmp_path: Path) -> None:
    reg, k1, k2, stranger = tmp_path / "reg", new_key(), new_key(), new_key()
    roots = [signing.public_key_bytes(k) for k in (k1, k2)]
    Publisher.create(reg, [k1, k2], root_keys=roots, threshold=2, now=T0).close()
    before = _files(reg)
    with pytest.raises(KeyFileError, match="needs 2"):
        Publisher(reg, [k1])
    with pytest.raises(KeyFileError, match="not one of the keys"):
        Publisher(reg, [k1, stranger])
    assert _files(reg) == before


def test_root_rotation_publishes_under_the_new_keys(tmp_path: Path) -> None:
    reg, old, new, alice = tmp_path / "reg", new_key(), new_key(), new_key()
    state = tmp_path / "state"
    with build_registry(reg, [old], [alice]) as pub:
        audit_registry(reg, state)
        result = pub.rotate_root([signing.public_key_bytes(new)], 1, [new], now=LATER)
    assert result.root_version == 2 and result.version == 3
    report = audit_registry(reg, state).report  # a client that trusted root 1 follows
    assert report.root_version == 2 and report.version == 3
    with pytest.raises(KeyFileError, match="not one of the keys"):
        Publisher(reg, [old])
    with Publisher(reg, [new]) as pub:  # a restart with the new key keeps publishing
        assert pub.publish(now=LATER + timedelta(minutes=1)).root_version == 2


def test_first_adapter_pins_the_tensor_layout(tmp_path: Path) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    with build_registry(reg, [key], [alice], config=PublisherConfig()) as pub:
        spec = pub.committed().state.document.tensor_spec
        assert spec is not None and len(spec) == 4
        other = make_export(alice, tensors=make_tensors(5, rank=3), rank=3)
        with pytest.raises(RegistryError, match="tensor spec"):
            pub.stage_adapter(other)
