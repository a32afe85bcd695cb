"""One test per attack (TUF's list, routing hijack, and the hardening issue's registry items):
each builds a registry, audits it once (so a trusted state exists), mounts the attack, and
asserts the audit rejects it AND that the trusted state did not change (python-tuf's rule;
tough once cached a rejected update)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import threading
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from registry_fixtures import (
    BASE_SHA,
    ROTATIONS,
    T0,
    add_target_files,
    build_registry,
    forge,
    inject_adapter,
    make_export,
    make_stats,
    make_tensors,
    new_key,
    record_for,
    sign_export_files,
    stored_files,
)
from tuf.api.metadata import Metadata, Root, Targets

from seqr.core import signing
from seqr.core.errors import ForkError, FreezeError, RegistryError, RollbackError, SeqrError
from seqr.core.stats import NormStatistics, RunningMoments
from seqr.registry import AuditConfig, AuditReport, audit_registry, layout, roles
from seqr.registry.publish import Publisher

LATER = T0 + timedelta(minutes=5)


def _state(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@dataclass
class Repo:
    path: Path
    state: Path
    server: list[Any]
    clients: list[Any]

    def audit(self, config: AuditConfig | None = None) -> AuditReport:
        return audit_registry(self.path, self.state, config=config).report

    def rejects(
        self,
        error: type[SeqrError],
        match: str,
        *,
        config: AuditConfig | None = None,
        path: Path | None = None,
    ) -> None:
        before = _state(self.state)
        with pytest.raises(error, match=match):
            audit_registry(path or self.path, self.state, config=config)
        assert _state(self.state) == before, "a rejected audit changed the trusted state"

    def publish(self, seed: int) -> None:
        with Publisher(self.path, self.server) as pub:
            pub.stage_adapter(make_export(self.clients[0], seed=seed))
            pub.publish(now=LATER + timedelta(seconds=seed))


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path / "registry", tmp_path / "state", [new_key()], [new_key(), new_key()])
    build_registry(r.path, r.server, r.clients).close()
    assert r.audit().version == 2  # the trusted state now pins version 2
    return r


def _keyid(key: Any) -> str:
    return signing.fingerprint(signing.public_key_bytes(key))


def _relist(files: dict[str, Path]) -> dict[str, Any]:
    """A malicious server re-listing an adapter's files as they are on disk now."""
    out = {}
    for name, path in files.items():
        data = path.read_bytes()
        target_path = f"adapters/{path.parent.name}/{name}"
        new = add_target_files(path.parents[3], path.parent.name, {name: data})
        out[target_path] = new[target_path]
    return out


# ---------------------------------------------------------------- arbitrary installation
def test_tampered_adapter_bytes_rejected(repo: Repo) -> None:
    weights = stored_files(repo.path)["adapter_model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight, same length: a mirror's backdoor
    weights.write_bytes(bytes(data))
    repo.rejects(RegistryError, "does not match its signed hash")


def test_tampered_statistics_rejected(repo: Repo) -> None:
    # Routing hijack: small mu, tiny sigma make this adapter win inputs that are not its own.
    files = stored_files(repo.path)
    files["norm_stats.json"].write_bytes(make_stats(mean=0.1, std=0.01))
    repo.rejects(RegistryError, "norm_stats.json")
    # The server re-lists the lying statistics: the client's signature says no.
    relisted = _relist({"norm_stats.json": files["norm_stats.json"]})

    def swap(targets: Targets) -> None:
        for path, info in relisted.items():
            targets.targets[path] = info

    forge(repo.path, repo.server, swap)
    repo.rejects(RegistryError, "norm_stats.json is not the file its signed record names")


def test_routing_hijack_statistics_swap_rejected(repo: Repo) -> None:
    # Two new adapters whose genuine, signed statistics were swapped by the server.
    a, b = (make_export(c, seed=5 + i) for i, c in enumerate(repo.clients))
    a["norm_stats.json"], b["norm_stats.json"] = b["norm_stats.json"], a["norm_stats.json"]
    inject_adapter(repo.path, repo.server, repo.clients[0], a)
    inject_adapter(repo.path, repo.server, repo.clients[1], b)
    repo.rejects(RegistryError, r"2 of 4 adapter\(s\) failed")


def test_swapped_signature_bundle_rejected(repo: Repo) -> None:
    # One client's genuine signature put on another client's adapter.
    a, b = make_export(repo.clients[0], seed=5), make_export(repo.clients[1], seed=6)
    sig = next(n for n in a if n not in ("adapter_config.json", "adapter_model.safetensors",
                                         "norm_stats.json", "manifest.json"))  # fmt: skip
    b[sig] = a[sig]
    inject_adapter(repo.path, repo.server, repo.clients[1], b)
    repo.rejects(RegistryError, "domain-6")


def test_forged_client_signature_rejected(repo: Repo) -> None:
    # The server signs an export in the victim's name with its own key.
    victim, attacker = repo.clients[0], new_key()
    files = make_export(victim, seed=5, stats=make_stats(mean=0.1, std=0.01))
    unsigned = {n: b for n, b in files.items() if n != "model.sig"}
    forged = sign_export_files(attacker, unsigned)  # the manifest still names the victim
    inject_adapter(repo.path, repo.server, victim, forged)
    repo.rejects(RegistryError, "adapter 'domain-5'.*(signature|verif)")


# ---------------------------------------------------------------- allow-list and keys
def test_unknown_client_key_rejected(repo: Repo) -> None:
    stranger = new_key()
    inject_adapter(repo.path, repo.server, stranger, make_export(stranger, seed=9))
    repo.rejects(RegistryError, "not on the registry's allow-list")


def test_client_id_that_is_a_prefix_of_an_enrolled_key_is_not_that_key(repo: Repo) -> None:
    # Hardening (key ids): only full fingerprints name keys; a short id never matches.
    client = repo.clients[0]
    files = make_export(client, seed=9)
    record = record_for(files, client, client=_keyid(client)[:23])
    inject_adapter(repo.path, repo.server, client, files, record)
    repo.rejects(RegistryError, "its export is signed by .*, not ")


def test_revoked_client_key_rejected(repo: Repo) -> None:
    revoked = repo.clients[0]
    with Publisher(repo.path, repo.server) as pub:
        pub.revoke_client(_keyid(revoked), "key leaked")
        pub.publish(now=LATER)
    assert len(repo.audit().entries) == 1
    inject_adapter(repo.path, repo.server, revoked, make_export(revoked, seed=5))
    repo.rejects(RegistryError, "was revoked")


def test_revocation_cannot_be_undone(repo: Repo) -> None:
    revoked = _keyid(repo.clients[0])
    with Publisher(repo.path, repo.server) as pub:
        pub.revoke_client(revoked, "key leaked")
        pub.publish(now=LATER)
    assert repo.audit().revoked == 1
    old_document = json.loads(  # version 2's seqr/registry.json, before the revocation
        next(
            p
            for p in (repo.path / "targets" / "seqr").iterdir()
            if revoked in p.read_text() and '"revoked":{}' in p.read_text()
        ).read_bytes()  # fmt: skip
    )
    data = json.dumps(old_document, sort_keys=True, separators=(",", ":")).encode()
    infos = add_target_files(repo.path, "x" * 64, {})  # noqa: F841 - only the helper's layout
    sha = hashlib.sha256(data).hexdigest()
    (repo.path / "targets" / "seqr" / f"{sha}.registry.json").write_bytes(data)

    def unrevoke(targets: Targets) -> None:
        info = targets.targets[layout.REGISTRY_TARGET]
        info.length, info.hashes = len(data), {"sha256": sha}

    forge(repo.path, repo.server, unrevoke)
    repo.rejects(RegistryError, "revocations cannot be undone")


def test_ansi_escapes_in_a_revocation_reason_are_never_printed_raw(
    repo: Repo, capsys: pytest.CaptureFixture[str]
) -> None:
    from seqr.cli import main as cli

    revoked = repo.clients[0]
    with Publisher(repo.path, repo.server) as pub:
        pub.revoke_client(_keyid(revoked), "\x1b[2J\x1b[31mall is fine\x1b[0m")
        pub.publish(now=LATER)
    inject_adapter(repo.path, repo.server, revoked, make_export(revoked, seed=5))
    assert cli.main(["registry", "audit", str(repo.path)]) == 1
    err = capsys.readouterr().err
    assert "was revoked" in err and "\x1b" not in err


# ---------------------------------------------------------------- server keys
def test_server_signature_below_threshold_rejected(tmp_path: Path) -> None:
    keys = [new_key() for _ in range(3)]
    roots = [signing.public_key_bytes(k) for k in keys]
    r = Repo(tmp_path / "registry", tmp_path / "state", keys[:2], [new_key()])
    build_registry(r.path, r.server, r.clients, threshold=2, root_keys=roots).close()
    assert len(r.audit().signed_by) == 2
    forge(r.path, [keys[0], new_key()])  # one root key of two, plus a stranger
    r.rejects(RegistryError, "1/2")


def test_one_key_listed_twice_in_a_root_counts_once(repo: Repo) -> None:
    # Hardening (key ids): a root listing one key under two key ids would let it count twice.
    root = Metadata[Root].from_bytes((repo.path / "metadata/1.root.json").read_bytes()).signed
    new = Root.from_dict(root.to_dict())
    new.version = 2
    key = next(iter(new.keys.values()))
    twin = type(key)("f" * 64, key.keytype, key.scheme, dict(key.keyval))
    new.add_key(twin, "targets")
    new.roles["targets"].threshold = 2
    data = roles.sign(Metadata(new), [roles.signer_for(k) for k in repo.server])
    (repo.path / "metadata/2.root.json").write_bytes(data)
    forge(repo.path, repo.server)
    repo.rejects(RegistryError, "one key under two key ids|1/2")


def test_rotated_out_key_cannot_sign(repo: Repo) -> None:
    new = new_key()
    with Publisher(repo.path, repo.server) as pub:
        pub.rotate_root([signing.public_key_bytes(new)], 1, [new], now=LATER)
    assert repo.audit().root_version == 2
    forge(repo.path, repo.server)  # the old (compromised, rotated-out) key signs a version
    repo.rejects(RegistryError, "0/1")


@pytest.mark.parametrize(
    ("case", "old", "new", "signers", "expected"), ROTATIONS, ids=[r[0] for r in ROTATIONS]
)
def test_key_rotation_table(
    tmp_path: Path,
    case: str,
    old: tuple[str, int],
    new: tuple[str, int],
    signers: str,
    expected: bool,
) -> None:
    """Each row: a registry under the old root, a root 2 signed by ``signers``, and a version
    signed by the new keys under it; the audit trusts it only if TUF 5.3.4 AND 5.3.5 hold."""
    keys = {name: new_key() for name in "ABCDE"}
    (old_names, old_threshold), (new_names, new_threshold) = old, new
    server = [keys[n] for n in old_names]
    r = Repo(tmp_path / "registry", tmp_path / "state", server, [new_key()])
    roots = [signing.public_key_bytes(keys[n]) for n in old_names]
    build_registry(r.path, r.server, r.clients, threshold=old_threshold, root_keys=roots).close()
    assert r.audit().root_version == 1
    root2 = roles.new_root(
        [roles.tuf_key(signing.public_key_bytes(keys[n])) for n in new_names],
        new_threshold,
        datetime.now(UTC) + timedelta(days=365),
    )
    root2.signed.version = 2
    data = roles.sign(root2, [roles.signer_for(keys[n]) for n in dict.fromkeys(signers)])
    (r.path / "metadata/2.root.json").write_bytes(data)
    forge(r.path, [keys[n] for n in new_names])
    if expected:
        assert r.audit().root_version == 2
    else:
        r.rejects(RegistryError, "root")


# ---------------------------------------------------------------- versions and time
def test_rollback_rejected(repo: Repo, tmp_path: Path) -> None:
    old_copy = tmp_path / "mirror-at-v2"
    shutil.copytree(repo.path, old_copy)
    repo.publish(5)
    assert repo.audit().version == 3
    repo.rejects(RollbackError, "rollback", path=old_copy)


def test_freeze_expired_metadata_rejected(repo: Repo) -> None:
    # A mirror serves a registry whose signed metadata expired (it stopped updating it).
    forge(repo.path, repo.server, now=datetime.now(UTC) - timedelta(days=8))
    repo.rejects(FreezeError, "expired")


def test_publisher_clock_far_ahead_cannot_lift_the_freeze_bound(repo: Repo) -> None:
    # Hardening (clock): a publish with a 2099 clock signs expiries in 2099; a client refuses
    # them, and the next publish with the right clock is accepted with a normal expiry.
    with Publisher(repo.path, repo.server) as pub:
        pub.publish(now=datetime(2099, 1, 1, tzinfo=UTC))
    repo.rejects(FreezeError, "2099")
    with Publisher(repo.path, repo.server) as pub:
        pub.stage_adapter(make_export(repo.clients[0], seed=5))
        pub.publish(now=datetime.now(UTC))
    report = repo.audit()
    assert report.expires < datetime.now(UTC) + timedelta(days=8)


def test_mix_and_match_across_versions_rejected(repo: Repo) -> None:
    repo.publish(5)
    v2, v3 = (repo.path / f"metadata/{v}.targets.json" for v in (2, 3))
    v3.write_bytes(v2.read_bytes())  # an old targets version served under the new name
    repo.rejects(RegistryError, "mix-and-match|hash|length")


def test_fork_split_view_rejected(repo: Repo, tmp_path: Path) -> None:
    fork = tmp_path / "fork"
    shutil.copytree(repo.path, fork)
    repo.publish(5)
    with Publisher(fork, repo.server) as pub:  # a different history shown to others
        for seed in (6, 7):
            pub.stage_adapter(make_export(repo.clients[0], seed=seed))
            pub.publish(now=LATER + timedelta(seconds=seed))
    assert repo.audit().version == 3
    repo.rejects(ForkError, "rewritten|split view|does not contain", path=fork)


def test_history_rewritten_below_the_trusted_version_rejected(repo: Repo) -> None:
    # The server re-signs version 1 differently and keeps publishing: the signed tree head
    # over the rewritten history does not extend the log this client trusts (RFC 9162).
    first = repo.path / "metadata/1.targets.json"
    first.write_bytes(first.read_bytes().replace(b'"version": 1', b'"version":  1'))
    forge(repo.path, repo.server)
    repo.rejects(ForkError, "rewritten|split view|does not contain")


def test_concurrent_audits_never_roll_the_trusted_state_back(repo: Repo, tmp_path: Path) -> None:
    # Hardening (trusted-state race): a stale mirror's audit finishing last must not put
    # version 2 back after version 3 was trusted (a fork of 3 would then pass).
    stale = tmp_path / "stale-mirror"
    shutil.copytree(repo.path, stale)
    fork = tmp_path / "fork"
    shutil.copytree(repo.path, fork)
    repo.publish(5)
    with Publisher(fork, repo.server) as pub:
        for seed in (6, 7):
            pub.stage_adapter(make_export(repo.clients[0], seed=seed))
            pub.publish(now=LATER + timedelta(seconds=seed))

    def run(source: Path, start: threading.Barrier) -> None:
        start.wait()
        with contextlib.suppress(SeqrError):
            audit_registry(source, repo.state)

    for _ in range(3):
        start = threading.Barrier(2)
        threads = [threading.Thread(target=run, args=(s, start)) for s in (repo.path, stale)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert repo.audit().version == 3
    repo.rejects(ForkError, "rewritten|split view|does not contain", path=fork)


# ---------------------------------------------------------------- files and endless data
def test_endless_data_oversized_files_rejected(repo: Repo) -> None:
    timestamp = repo.path / "metadata/timestamp.json"
    good = timestamp.read_bytes()
    timestamp.write_bytes(good[:-1] + b" " * 100_000 + b"}")
    repo.rejects(RegistryError, "endless data|exceeding")
    timestamp.write_bytes(good)
    small = AuditConfig(max_adapter_bytes=100)
    repo.rejects(RegistryError, "over the limit of 100 .endless data.", config=small)


def test_sparse_huge_history_files_cost_no_memory(repo: Repo, tmp_path: Path) -> None:
    # Hardening (files read before their signature): a hostile mirror replaces old targets
    # versions with huge sparse files; a first-use client streams at most the cap of one.
    repo.publish(5)
    for v in (1, 2):
        with open(repo.path / f"metadata/{v}.targets.json", "wb") as f:
            f.truncate(200 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(RegistryError, match="endless data|exceeding"):
            audit_registry(repo.path, tmp_path / "first-use",
                           config=AuditConfig(max_targets_bytes=8 * 1024 * 1024))  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024, f"{peak / 1e6:.0f} MB held while refusing"


def test_fifo_in_place_of_a_metadata_file_does_not_hang(repo: Repo) -> None:
    timestamp = repo.path / "metadata/timestamp.json"
    timestamp.unlink()
    os.mkfifo(timestamp)
    repo.rejects(RegistryError, "not a regular file")


def test_symlinked_folder_inside_a_registry_is_not_followed(repo: Repo, tmp_path: Path) -> None:
    adapter = stored_files(repo.path)["adapter_model.safetensors"].parent
    elsewhere = tmp_path / "elsewhere"
    shutil.move(adapter, elsewhere)
    adapter.symlink_to(elsewhere, target_is_directory=True)
    repo.rejects(RegistryError, "symlink")


# ---------------------------------------------------------------- what an adapter holds
def test_degenerate_statistics_listed_by_the_server_rejected(repo: Repo) -> None:
    client = repo.clients[0]
    stats = NormStatistics()
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        stats.modules[module] = RunningMoments(1, 4, np.array([5.0]), np.array([0.0]))  # std 0
    inject_adapter(repo.path, repo.server, client,
                   make_export(client, seed=5, stats=stats.to_json_bytes()))  # fmt: skip
    repo.rejects(RegistryError, "std 0 is outside the allowed range")


def test_lora_a_other_than_the_shared_a_listed_by_the_server_rejected(repo: Repo) -> None:
    # SEQR needs one A per module shared by all adapters (||B A x|| = ||R (A x)||).
    client = repo.clients[0]
    tensors = make_tensors(6)
    name = next(n for n in tensors if "lora_A" in n)
    tensors[name] = tensors[name] * 1.5
    inject_adapter(repo.path, repo.server, client, make_export(client, tensors=tensors))
    repo.rejects(RegistryError, "not the federation's shared A")


class _Exploit:
    """A pickle that creates a file when loaded: what torch.load would run."""

    marker: Path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_pickle_payload_rejected(repo: Repo, tmp_path: Path) -> None:
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    payload = pickle.dumps(exploit, protocol=4)
    client = repo.clients[0]
    inject_adapter(repo.path, repo.server, client, make_export(client, weights=payload))
    repo.rejects(RegistryError, "pickle")
    assert not exploit.marker.exists(), "the pickle was loaded"


def test_nan_weights_rejected(repo: Repo) -> None:
    tensors = make_tensors(8)
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name][1, 1] = np.nan
    client = repo.clients[0]
    inject_adapter(repo.path, repo.server, client, make_export(client, tensors=tensors))
    repo.rejects(RegistryError, "NaN or infinite")


def test_wrong_shapes_rejected(repo: Repo) -> None:
    client = repo.clients[0]
    tensors = make_tensors(8)
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name] = np.ones((4, 3), dtype=np.float32)  # rank 3 in a rank-2 federation
    inject_adapter(repo.path, repo.server, client, make_export(client, tensors=tensors))
    repo.rejects(RegistryError, r"lora_B must be \[d_out, 2\]")


def test_wrong_software_other_base_model_rejected(repo: Repo) -> None:
    client = repo.clients[0]
    other = hashlib.sha256(b"another model").hexdigest()
    assert other != BASE_SHA
    inject_adapter(repo.path, repo.server, client,
                   make_export(client, seed=7, base_model_sha256=other))  # fmt: skip
    repo.rejects(RegistryError, "adapter for another model")


def test_extraneous_target_rejected(repo: Repo) -> None:
    def add(targets: Targets) -> None:
        targets.targets.update(add_target_files(repo.path, "0" * 64, {"install.sh": b"evil"}))

    forge(repo.path, repo.server, add)
    repo.rejects(RegistryError, "no valid seqr record|bad seqr record")
