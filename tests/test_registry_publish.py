"""The publisher: consistent snapshots, staging that survives restarts, roll-forward, rotation."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from registry_fixtures import (
    FEDERATION,
    T0,
    adapter_dir,
    build_registry,
    latest_version,
    make_export,
    make_stats,
    make_tensors,
    new_key,
    read_payload,
)

from seqr.core import signing
from seqr.core.errors import AdmissionError, RegistryError, SignatureError
from seqr.core.export_folder import read_export
from seqr.registry import merkle, store
from seqr.registry.config import PublisherConfig
from seqr.registry.publish import Publisher
from seqr.registry.verify import RegistryFiles, verify_metadata

LATER = T0 + timedelta(hours=1)


def _verify(path: Path) -> None:
    """The auditor's metadata checks on what is on disk (first use)."""
    n = latest_version(path)
    roots = []
    while (path / store.root_path(len(roots) + 1)).exists():
        roots.append((path / store.root_path(len(roots) + 1)).read_bytes())
    files = RegistryFiles(
        pointer=(path / store.POINTER).read_bytes(),
        roots=roots[: read_payload(path, n)["root_version"]],
        metadata=[(path / store.metadata_path(v)).read_bytes() for v in range(1, n + 1)],
        tree_head=(path / store.tree_head_path(n)).read_bytes(),
    )
    verify_metadata(files, None, LATER)


def test_create_writes_a_complete_version_one(tmp_path: Path) -> None:
    key = new_key()
    Publisher.create(tmp_path / "reg", [key], now=T0).close()
    reg = tmp_path / "reg"
    assert latest_version(reg) == 1
    for rel in (store.root_path(1), store.metadata_path(1), store.tree_head_path(1)):
        assert (reg / rel).is_file(), rel
    assert read_payload(reg, 1)["entries"] == [] and read_payload(reg, 1)["previous"] is None
    _verify(reg)
    with pytest.raises(RegistryError, match="not empty"):
        Publisher.create(reg, [key], now=T0)


def test_publish_chains_versions_and_logs_every_one(tmp_path: Path) -> None:
    reg, key, clients = tmp_path / "reg", new_key(), [new_key(), new_key()]
    with build_registry(reg, [key], clients) as pub:
        result = pub.publish(now=LATER)  # nothing staged: refreshes the expiry
    assert result.version == 3 and result.entries == 2 and result.added == ()
    for v in (2, 3):
        prev = (reg / store.metadata_path(v - 1)).read_bytes()
        assert read_payload(reg, v)["previous"] == {
            "version": v - 1,
            "sha256": hashlib.sha256(prev).hexdigest(),
        }
    leaves = [merkle.leaf_hash((reg / store.metadata_path(v)).read_bytes()) for v in (1, 2, 3)]
    assert result.tree_root == merkle.root_hash(leaves).hex() and result.tree_size == 3
    _verify(reg)


def test_stage_adapter_refuses_unknown_revoked_and_duplicate(tmp_path: Path) -> None:
    reg, key, alice, mallory = tmp_path / "reg", new_key(), new_key(), new_key()
    with build_registry(reg, [key], [alice]) as pub:
        with pytest.raises(AdmissionError, match="unknown_client"):
            pub.stage_adapter(make_export(mallory, seed=5))
        same_weights_other_stats = make_export(alice, seed=0, stats=b'{"other": 1}')
        with pytest.raises(AdmissionError, match="duplicate_adapter"):
            pub.stage_adapter(same_weights_other_stats)
        # The same export again (a retried round: the same bytes; ECDSA signatures are
        # randomised, so signing again would make another export): a no-op.
        assert pub.stage_adapter(read_export(adapter_dir(reg))) is not None
        pub.revoke_client(signing.fingerprint(signing.public_key_bytes(alice)), "leaked key")
        with pytest.raises(AdmissionError, match="revoked_client"):
            pub.stage_adapter(make_export(alice, seed=9))
        assert pub.publish(now=LATER).entries == 0


def test_stage_adapter_runs_the_auditors_checks(tmp_path: Path) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    with build_registry(reg, [key], [alice]) as pub:
        tampered = make_export(alice, seed=3)
        tampered["norm_stats.json"] = make_stats(mean=0.1, std=0.01)  # lying statistics
        with pytest.raises(SignatureError, match="changed after signing"):
            pub.stage_adapter(tampered)
        tensors = make_tensors(4)
        next(iter(tensors.values()))[0, 0] = np.nan
        with pytest.raises(RegistryError, match="NaN"):
            pub.stage_adapter(make_export(alice, tensors=tensors))
        assert not any((reg / store.STAGING).glob("*.json"))


def test_auto_enrol_admits_new_client_keys(tmp_path: Path) -> None:
    reg, key, bob = tmp_path / "reg", new_key(), new_key()
    config = PublisherConfig(federation=FEDERATION, auto_enrol=True)
    with build_registry(reg, [key], [], config=config) as pub:
        pub.stage_adapter(make_export(bob, seed=1))
        assert pub.publish(now=LATER).entries == 1
    assert signing.fingerprint(signing.public_key_bytes(bob)) in read_payload(reg, 3)["clients"]


def test_revocation_removes_the_clients_adapters_for_good(tmp_path: Path) -> None:
    reg, key, alice, bob = tmp_path / "reg", new_key(), new_key(), new_key()
    alice_id = signing.fingerprint(signing.public_key_bytes(alice))
    with build_registry(reg, [key], [alice, bob]) as pub:
        pub.revoke_client(alice_id, "key leaked")
        result = pub.publish(now=LATER)
        assert result.entries == 1 and len(result.removed) == 1
        with pytest.raises(AdmissionError, match="revoked"):
            pub.enrol_client(signing.public_key_bytes(alice))
    payload = read_payload(reg, 3)
    assert alice_id in payload["revoked"] and alice_id not in payload["clients"]
    _verify(reg)


def test_staged_adapters_survive_a_restart(tmp_path: Path) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    build_registry(reg, [key], [alice]).close()
    with Publisher(reg, [key]) as pub:
        sha = pub.stage_adapter(make_export(alice, seed=7))
    with Publisher(reg, [key]) as pub:  # "the server restarted"
        result = pub.publish(now=LATER)
    assert sha in result.added and not any((reg / store.STAGING).glob("*.json"))


def test_restart_rolls_forward_a_version_written_before_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    build_registry(reg, [key], [alice]).close()
    real_write_file = store.write_file

    def crash_on_pointer(path: Path, data: bytes) -> None:
        if Path(path).name == store.POINTER:
            raise KeyboardInterrupt("simulated crash before the commit point")
        real_write_file(path, data)

    pub = Publisher(reg, [key])
    sha = pub.stage_adapter(make_export(alice, seed=8))
    monkeypatch.setattr(store, "write_file", crash_on_pointer)
    with pytest.raises(KeyboardInterrupt):
        pub.publish(now=LATER)
    pub.close()
    monkeypatch.setattr(store, "write_file", real_write_file)
    assert latest_version(reg) == 2 and (reg / store.metadata_path(3)).exists()
    _verify(reg)  # readers still see the complete version 2
    signed = (reg / store.metadata_path(3)).read_bytes()
    with Publisher(reg, [key]) as pub:
        assert pub.version == 3  # rolled forward, not re-signed
        assert sha in {e.adapter_sha256 for e in pub.metadata.entries}
    assert (reg / store.metadata_path(3)).read_bytes() == signed
    assert not any((reg / store.STAGING).glob("*.json"))
    _verify(reg)


def test_only_one_publisher_at_a_time(tmp_path: Path) -> None:
    reg, key = tmp_path / "reg", new_key()
    with (
        Publisher.create(reg, [key], now=T0),
        pytest.raises(RegistryError, match="another publisher"),
    ):
        Publisher(reg, [key])


def test_publisher_below_threshold_writes_nothing(tmp_path: Path) -> None:
    reg, k1, k2 = tmp_path / "reg", new_key(), new_key()
    roots = [signing.public_key_bytes(k) for k in (k1, k2)]
    Publisher.create(reg, [k1, k2], root_keys=roots, threshold=2, now=T0).close()
    with Publisher(reg, [k1]) as pub, pytest.raises(SignatureError, match="1/2"):
        pub.publish(now=LATER)
    assert latest_version(reg) == 1 and not (reg / store.metadata_path(2)).exists()


def test_root_rotation_publishes_under_the_new_keys(tmp_path: Path) -> None:
    reg, old, new, alice = tmp_path / "reg", new_key(), new_key(), new_key()
    with build_registry(reg, [old], [alice]) as pub:
        result = pub.rotate_root([signing.public_key_bytes(new)], 1, [new], now=LATER)
    assert result.root_version == 2 and read_payload(reg, 3)["root_version"] == 2
    envelope = json.loads((reg / store.metadata_path(3)).read_bytes())
    assert [s["keyid"] for s in envelope["signatures"]] == [
        signing.fingerprint(signing.public_key_bytes(new))
    ]
    _verify(reg)
    with Publisher(reg, [new]) as pub:  # a restart with the new key keeps publishing
        assert pub.publish(now=LATER + timedelta(minutes=1)).root_version == 2


def test_first_adapter_pins_the_tensor_layout(tmp_path: Path) -> None:
    reg, key, alice = tmp_path / "reg", new_key(), new_key()
    with build_registry(reg, [key], [alice], config=PublisherConfig()) as pub:
        spec = read_payload(reg, 2)["tensor_spec"]
        assert spec is not None and len(spec) == 4
        other = make_export(alice, tensors=make_tensors(5, rank=3), rank=3)
        with pytest.raises(RegistryError, match="tensor spec"):
            pub.stage_adapter(other)
