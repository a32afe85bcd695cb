"""Provenance of group adapters: the server signs the adapter, each client signs its
contributions, and the registry's audit verifies both. One test per attack; after each
rejection the registry (and the auditor's trusted state) is unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from registry_fixtures import key_file, sign_export_files
from tiny import tiny_model_dir

from seqr.core import signing
from seqr.core.base_model import load_base_model
from seqr.core.errors import AdmissionError, RegistryError, SeqrError
from seqr.core.federation import FederationConfig
from seqr.core.manifest import (
    ADAPTER_WEIGHTS_NAME,
    MANIFEST_NAME,
    NORM_STATS_NAME,
    SIGNATURE_NAME,
    Manifest,
    parse_manifest,
)
from seqr.core.stats import NormStatistics
from seqr.operator.federation_setup import FederationSetup, setup_federation
from seqr.operator.group_export import build_group_export
from seqr.operator.registry_ops import init_registry, open_publisher
from seqr.registry.audit import audit_registry
from seqr.registry.contributions import (
    Contribution,
    ContributionsFile,
    SignedContribution,
    arrays_sha256,
    merge_partial_statistics,
    record_digest,
    round_digest,
    sign_contribution,
    verify_contributions,
)
from seqr.registry.metadata import CONTRIBUTIONS_FILE

NOW = datetime.now(UTC).replace(microsecond=0)
SESSION = "5e" * 16
ROUNDS = 2


@pytest.fixture(scope="module")
def setup() -> FederationSetup:
    fed = FederationConfig(base_model=str(tiny_model_dir()), lora_rank=4)
    base = load_base_model(fed.base_model)
    return setup_federation(fed, base.model, base.sha256)


def _b(setup: FederationSetup, seed: int) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    return {m.b_tensor: gen.standard_normal((m.d_out, 4)).astype(np.float32) * 0.01
            for m in setup.modules}  # fmt: skip


def _stats(setup: FederationSetup, seed: int) -> bytes:
    gen = np.random.default_rng(seed)
    stats = NormStatistics()
    for m in setup.modules:
        stats.update(m.name, np.abs(gen.normal(1.0, 0.2, 50 + seed)))
    return stats.to_json_bytes()


def _record(
    key, kind, rnd, examples, sha, base, parent="00" * 32, *, session=SESSION
) -> SignedContribution:
    record = Contribution("wiki", session, kind, rnd, signing.public_key_bytes(key), examples,
                          sha, base, parent)  # fmt: skip
    return sign_contribution(record, key)


def _contributions(setup, clients) -> tuple[ContributionsFile, dict[str, np.ndarray], int]:
    """Two rounds by every client; the last global B is the published one. Each record
    names, as its parent, the round digest of the global B it started from (the chain)."""
    globals_ = [arrays_sha256({k: np.zeros_like(v) for k, v in _b(setup, 0).items()})]
    final = _b(setup, ROUNDS)
    globals_ += [arrays_sha256(_b(setup, 1)), arrays_sha256(final)]
    signed, partials, total = [], {}, 0
    aggregated: list[tuple[str, ...]] = []
    parent = round_digest(globals_[0], ())
    for rnd in range(1, ROUNDS + 1):
        this_round = [
            _record(key, "update", rnd, 100 + i, arrays_sha256(_b(setup, 10 * i + rnd)),
                    globals_[rnd - 1], parent)
            for i, key in enumerate(clients)
        ]  # fmt: skip
        signed += this_round
        aggregated.append(tuple(record_digest(r) for r in this_round))
        parent = round_digest(globals_[rnd], aggregated[-1])
    for i, key in enumerate(clients):
        stats = _stats(setup, i)
        partials[signing.fingerprint(signing.public_key_bytes(key))] = stats
        signed.append(_record(key, "statistics", ROUNDS, 60 + i,
                              hashlib.sha256(stats).hexdigest(), globals_[-1], parent))  # fmt: skip
        total += 60 + i
    doc = ContributionsFile("wiki", SESSION, ROUNDS, "fedavg weighted by num-examples", "none",
                            tuple(globals_), tuple(aggregated), 1000, 500_000, tuple(signed),
                            partials)  # fmt: skip
    return doc, final, total


@pytest.fixture()
def world(tmp_path: Path, setup: FederationSetup) -> dict:
    server = signing.generate_private_key()
    clients = [signing.generate_private_key() for _ in range(3)]
    registry = tmp_path / "registry"
    init_registry(registry, [server], setup=setup, now=NOW)
    with open_publisher(registry, [server], setup) as pub:
        for key in clients:
            pub.enrol_client(signing.public_key_bytes(key), now=NOW)
        pub.publish(now=NOW)
    doc, final, total = _contributions(setup, clients)
    stats = merge_partial_statistics(doc.statistics).to_json_bytes()
    files = build_group_export(
        setup, final, stats, doc, key_file(server), example_count=total, created=NOW
    )
    state = tmp_path / "state"
    return {"registry": registry, "server": server, "clients": clients, "files": files,
            "doc": doc, "setup": setup, "total": total, "state": state}  # fmt: skip


def _resign(files: dict[str, bytes], key, **changes: bytes) -> dict[str, bytes]:
    """A malicious (or buggy) server re-signs changed files (model-signing bundle by ``key``)."""
    files = {**files, **changes}
    old = parse_manifest(files[MANIFEST_NAME])
    manifest = dataclasses.replace(old, public_key=signing.public_key_bytes(key).hex())
    signed = {n: b for n, b in files.items() if n != SIGNATURE_NAME}
    signed[MANIFEST_NAME] = Manifest.to_bytes(manifest)
    return sign_export_files(key, signed, name=old.name)


def _publish(world: dict, files: dict[str, bytes]) -> str:
    with open_publisher(world["registry"], [world["server"]], world["setup"]) as pub:
        sha = pub.stage_adapter(files, admitted=NOW)
        pub.publish(now=NOW)
    return sha


def _verify(world: dict, files: dict[str, bytes]):
    manifest = parse_manifest(files[MANIFEST_NAME])
    return verify_contributions(files[CONTRIBUTIONS_FILE], group=manifest.name,
                                adapter_weights=files[ADAPTER_WEIGHTS_NAME],
                                stats_bytes=files[NORM_STATS_NAME],
                                example_count=manifest.example_count)  # fmt: skip


def test_group_adapter_audit_lists_every_signed_contributor(world: dict) -> None:
    sha = _publish(world, world["files"])
    report = audit_registry(world["registry"], world["state"]).report
    entry = {e.adapter_sha256: e for e in report.entries}[sha]
    ids = sorted(signing.fingerprint(signing.public_key_bytes(k)) for k in world["clients"])
    assert entry.name == "wiki" and entry.group_rounds == ROUNDS
    assert list(entry.contributors) == ids
    assert entry.client == signing.fingerprint(signing.public_key_bytes(world["server"]))
    assert sorted(entry.examples_by_client.values()) == [100, 101, 102]  # training chunks
    listed = report.to_json()["entries"][0]
    assert listed["contributors"] == ids and listed["group_rounds"] == ROUNDS


def test_forged_contribution_signature_rejected(world: dict) -> None:
    doc = world["doc"]
    first = doc.contributions[0]
    forged_sig = bytes([first.signature[0] ^ 1]) + first.signature[1:]
    forged = dataclasses.replace(doc, contributions=(SignedContribution(first.payload, forged_sig),
                                                     *doc.contributions[1:]))  # fmt: skip
    files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: forged.to_bytes()})
    with pytest.raises(RegistryError, match="forged or altered contribution"):
        _verify(world, files)
    before = _files(world["registry"])
    with pytest.raises(SeqrError, match="forged or altered contribution"):
        _publish(world, files)
    assert _files(world["registry"]) == before
    # A record whose example count was inflated after signing is a forgery too.
    record = json.loads(first.payload)
    inflated = json.dumps({**record, "example_count": 10**6}, sort_keys=True,
                          separators=(",", ":")).encode()  # fmt: skip
    changed = dataclasses.replace(doc, contributions=(SignedContribution(inflated, first.signature),
                                                      *doc.contributions[1:]))  # fmt: skip
    with pytest.raises(RegistryError, match="forged or altered contribution"):
        _verify(world, _resign(world["files"], world["server"],
                               **{CONTRIBUTIONS_FILE: changed.to_bytes()}))  # fmt: skip


def test_contribution_list_tampered_rejected(world: dict) -> None:
    doc = world["doc"]
    # A contributor dropped from the list (its records and statistics): the published
    # statistics are no longer the merge of the signed partial ones.
    dropped = next(iter(doc.statistics))
    fewer = dataclasses.replace(
        doc,
        contributions=tuple(c for c in doc.contributions
                            if json.loads(c.payload)["client_key"] != _key_hex(dropped, world)),
        statistics={k: v for k, v in doc.statistics.items() if k != dropped},
    )  # fmt: skip
    files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: fewer.to_bytes()})
    with pytest.raises(RegistryError, match="global B is not tied to its updates"):
        _verify(world, files)
    # Only its statistics dropped: the published statistics are no longer the exact merge.
    mine = _key_hex(dropped, world)
    no_stats = dataclasses.replace(
        doc,
        contributions=tuple(c for c in doc.contributions
                            if (json.loads(c.payload)["client_key"], json.loads(c.payload)["kind"])
                            != (mine, "statistics")),
        statistics={k: v for k, v in doc.statistics.items() if k != dropped},
    )  # fmt: skip
    files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: no_stats.to_bytes()})
    with pytest.raises(RegistryError, match="exact merge"):
        _verify(world, files)
    # A partial statistics file swapped for another: its signed hash no longer matches.
    swapped = dataclasses.replace(
        doc, statistics={**doc.statistics, dropped: _stats(world["setup"], 9)}
    )
    files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: swapped.to_bytes()})
    with pytest.raises(RegistryError, match="they were changed"):
        _verify(world, files)
    # contributions.json changed on the mirror after publication: the audit refuses the
    # registry and the trusted state is unchanged.
    sha = _publish(world, world["files"])
    audit_registry(world["registry"], world["state"])
    trusted = _files(world["state"])
    folder = world["registry"] / "targets" / "adapters" / sha
    path = next(folder.glob(f"*.{CONTRIBUTIONS_FILE}"))
    path.write_bytes(fewer.to_bytes())
    with pytest.raises(RegistryError, match="contributions.json"):
        audit_registry(world["registry"], world["state"])
    assert _files(world["state"]) == trusted


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _key_hex(keyid: str, world: dict) -> str:
    for key in world["clients"]:
        public = signing.public_key_bytes(key)
        if signing.fingerprint(public) == keyid:
            return public.hex()
    raise AssertionError(keyid)


def test_replayed_contribution_from_another_run_rejected(world: dict) -> None:
    doc = world["doc"]
    key = world["clients"][0]
    old = _record(key, "update", 1, 100, "00" * 32, doc.globals[0], session="77" * 16)
    replayed = dataclasses.replace(doc, contributions=(old, *doc.contributions[1:]))
    files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: replayed.to_bytes()})
    with pytest.raises(RegistryError, match="replayed from another run"):
        _verify(world, files)


def test_statistics_of_another_model_rejected_as_split_view(world: dict) -> None:
    doc = world["doc"]
    key = world["clients"][0]
    keyid = signing.fingerprint(signing.public_key_bytes(key))
    stats = doc.statistics[keyid]
    other = _record(key, "statistics", ROUNDS, 60, hashlib.sha256(stats).hexdigest(), "ab" * 32,
                    doc.round_digest(ROUNDS))  # fmt: skip
    mine = signing.public_key_bytes(key).hex()

    def is_mine(c: SignedContribution) -> bool:
        record = json.loads(c.payload)
        return record["kind"] == "statistics" and record["client_key"] == mine

    records = tuple(other if is_mine(c) else c for c in doc.contributions)
    changed = dataclasses.replace(doc, contributions=records).to_bytes()
    files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: changed})
    with pytest.raises(RegistryError, match="split view"):
        _verify(world, files)


def test_group_adapter_signed_by_a_client_key_rejected(world: dict) -> None:
    client = world["clients"][0]
    files = _resign(world["files"], client)
    before = _files(world["registry"])
    with pytest.raises(AdmissionError, match="must be signed by a server key"):
        _publish(world, files)
    assert _files(world["registry"]) == before


def test_revoking_a_contributor_removes_the_group_adapter(world: dict) -> None:
    sha = _publish(world, world["files"])
    keyid = signing.fingerprint(signing.public_key_bytes(world["clients"][1]))
    with open_publisher(world["registry"], [world["server"]], world["setup"]) as pub:
        pub.revoke_client(keyid, "poisoned its updates", now=NOW)
        published = pub.publish(now=NOW)
    assert published.removed == (sha,)
    report = audit_registry(world["registry"], world["state"]).report
    assert report.entries == () and report.revoked == 1


def test_forged_round_chain_rejected(world: dict) -> None:
    doc = world["doc"]
    before = _files(world["registry"])
    # 1. The file claims round 1 averaged other updates than the ones signed for it.
    other = (*doc.aggregated[0][1:], "cd" * 32)
    relisted = dataclasses.replace(doc, aggregated=(other, *doc.aggregated[1:]))
    # 2. Round 1's listing is right, but each member of round 2 signed a different history
    #    (the parent digest of round 1) than the file states: re-signed records of round 2
    #    naming a forged parent.
    key = world["clients"][0]
    mine = signing.public_key_bytes(key).hex()
    forged_parent = []
    for c in doc.contributions:
        record = json.loads(c.payload)
        if (record["client_key"], record["kind"], record["round"]) == (mine, "update", 2):
            c = _record(key, "update", 2, record["example_count"], record["sha256"],
                        record["base_sha256"], "ef" * 32)  # fmt: skip
        forged_parent.append(c)
    digests = [
        record_digest(c)
        for c in forged_parent
        if json.loads(c.payload)["kind"] == "update" and json.loads(c.payload)["round"] == 2
    ]
    rechained = dataclasses.replace(doc, contributions=tuple(forged_parent),
                                    aggregated=(doc.aggregated[0], tuple(digests)))  # fmt: skip
    # 3. A signed update of round 1 listed as a contribution but not averaged into round 1.
    outsider = signing.generate_private_key()
    extra = _record(outsider, "update", 1, 100, "12" * 32, doc.globals[0], doc.round_digest(0))
    padded = dataclasses.replace(doc, contributions=(*doc.contributions, extra))
    cases = (
        (relisted, "forged round chain", "forged round chain"),  # round 2 signed round 1's list
        (rechained, "forged round chain", "forged round chain"),
        (padded, "global B is not tied to its updates", "not tied|not enrolled"),
    )
    for changed, match, publish_match in cases:
        files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: changed.to_bytes()})
        with pytest.raises(RegistryError, match=match):
            _verify(world, files)
        with pytest.raises(SeqrError, match=publish_match):
            _publish(world, files)
        assert _files(world["registry"]) == before


def test_update_claiming_more_examples_than_the_rule_rejected_by_the_audit(world: dict) -> None:
    doc = dataclasses.replace(world["doc"], max_examples=50)  # every update claims >= 100
    files = _resign(world["files"], world["server"], **{CONTRIBUTIONS_FILE: doc.to_bytes()})
    with pytest.raises(RegistryError, match="claims 102 examples, over the group's maximum of 50"):
        _verify(world, files)
