"""The server's round logic without Flower: real signed exports from the real client code,
a real registry, the registry's own audit at the end."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from _server_world import (
    Client,
    federation_setup,
    lying_stats,
    make_client,
    now,
    probe,
    resign,
)

from seqr.core import key_files, signing
from seqr.core.manifest import NORM_STATS_NAME
from seqr.core.stats import NormStatistics
from seqr.operator.registry_ops import init_registry, open_publisher
from seqr.operator.round import ReplayStore, RoundRunner, Submission
from seqr.operator.settings import state_dir_for
from seqr.registry.audit import audit_registry


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> list[Client]:
    root = tmp_path_factory.mktemp("clients")
    return [make_client(root, i) for i in range(3)]


@pytest.fixture
def server_key(tmp_path: Path) -> Path:
    folder = tmp_path / "server-key"
    key_files.write_keypair(folder)
    return folder


def new_registry(tmp_path: Path, server_key: Path, enrolled: list[Client]) -> Path:
    registry = tmp_path / "registry"
    keys = [key_files.load_private_key(server_key / signing.PRIVATE_KEY_NAME)]
    init_registry(registry, keys, setup=federation_setup())
    with open_publisher(registry, keys, None) as publisher:
        for client in enrolled:
            publisher.enrol_client(client.public)
        publisher.publish()  # version 2: the allow-list
    return registry


def runner(registry: Path, server_key: Path, *, auto_enrol: bool = False) -> RoundRunner:
    keys = [key_files.load_private_key(server_key / signing.PRIVATE_KEY_NAME)]
    publisher = open_publisher(registry, keys, federation_setup(), auto_enrol=auto_enrol)
    return RoundRunner(publisher, federation_setup(), probe(), ReplayStore(state_dir_for(registry)))


def test_round_admits_honest_skips_failures_and_publishes_next_version(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:2])
    round_ = runner(registry, server_key)
    subs = [
        Submission(11, clients[0].files()),
        Submission.failed(12, "timeout"),
        Submission(13, clients[1].files()),
        Submission.failed(14, "ClientAppException: out of memory"),
    ]
    result = round_.run(subs, now=now())
    round_.publisher.close()
    verdicts = result.by_node()
    assert [verdicts[n].status for n in (11, 12, 13, 14)] == [
        "admitted", "failed", "admitted", "failed",
    ]  # fmt: skip
    assert (verdicts[12].reason, verdicts[14].reason) == ("timeout", "client_error")
    assert result.published.version == 3 and result.published.entries == 2
    assert {v.registry_version for v in result.verdicts} == {3}
    assert set(result.published.added) == {verdicts[11].adapter_sha256, verdicts[13].adapter_sha256}
    report = audit_registry(registry).report
    assert report.version == 3
    assert {e.adapter_sha256 for e in report.entries} == set(result.published.added)
    assert {e.name for e in report.entries} == {"client-0", "client-1"}


def test_rejections_carry_their_reason_and_leave_replay_state_unchanged(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:2])
    tampered = clients[0].files()
    tampered[NORM_STATS_NAME] = tampered[NORM_STATS_NAME].replace(b"1", b"2", 1)
    honest = NormStatistics.from_json_bytes(clients[1].files()[NORM_STATS_NAME])
    liar = resign(clients[1], tmp_path / "liar", stats=lying_stats(honest, 0.2, 0.01))
    round_ = runner(registry, server_key)
    result = round_.run(
        [
            Submission(1, tampered),
            Submission(2, liar),
            Submission(3, clients[2].files()),  # signed by a key that was never enrolled
            Submission(4, {"manifest.json": b"{}"}),
        ],
        now=now(),
    )
    round_.publisher.close()
    reasons = {v.node_id: (v.status, v.reason) for v in result.verdicts}
    assert reasons == {
        1: ("rejected", "hash_mismatch"),
        2: ("rejected", "implausible_stats"),
        3: ("rejected", "unknown_key"),
        4: ("rejected", "wrong_files"),
    }
    assert "probe" in result.by_node()[2].message
    assert result.by_node()[2].client == signing.fingerprint(clients[1].public)
    assert not ReplayStore(state_dir_for(registry)).path.exists()  # nothing was accepted
    # Nothing admitted: no new targets version, only a fresh timestamp (TUF).
    assert result.published.version == 2 and result.published.entries == 0


def test_malformed_submission_cannot_stop_the_round(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:1])
    broken = dict(clients[0].files())
    broken["adapter_model.safetensors"] = 12345  # type: ignore[assignment]  # not bytes
    round_ = runner(registry, server_key)
    result = round_.run([Submission(1, broken), Submission(2, clients[0].files())], now=now())
    round_.publisher.close()
    assert [(v.status, v.reason) for v in result.verdicts] == [
        ("rejected", "internal_error"),
        ("admitted", ""),
    ]


def test_same_submission_twice_in_one_round_is_a_duplicate(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:1])
    round_ = runner(registry, server_key)
    files = clients[0].files()
    result = round_.run([Submission(1, files), Submission(2, files)], now=now())
    round_.publisher.close()
    assert [(v.status, v.reason) for v in result.verdicts] == [
        ("admitted", ""),
        ("rejected", "duplicate"),
    ]
    assert result.published.entries == 1


def test_restarted_server_continues_and_refuses_replays(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:2])
    first = runner(registry, server_key)
    one = first.run([Submission(1, clients[0].files())], now=now())
    first.publisher.close()  # the ServerApp stops
    again = runner(registry, server_key)  # a new process: Publisher and replay state reloaded
    assert again.publisher.version == one.published.version == 3
    newer = resign(clients[0], tmp_path / "newer")  # same weights, signed again later
    two = again.run(
        [
            Submission(1, clients[0].files()),
            Submission(2, clients[1].files()),
            Submission(3, newer),
        ],
        now=now(),
    )
    again.publisher.close()
    assert [(v.status, v.reason) for v in two.verdicts] == [
        ("rejected", "duplicate"),
        ("admitted", ""),
        ("rejected", "duplicate_adapter"),  # the registry already lists these weights
    ]
    assert two.published.version == 4 and two.published.entries == 2
    assert audit_registry(registry).report.version == 4


def test_staged_adapter_is_published_after_a_crash_before_publish(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:1])
    crashed = runner(registry, server_key)
    sha = crashed.publisher.stage_adapter(clients[0].files())  # staged, then the process dies
    crashed.publisher.close()
    restarted = runner(registry, server_key)
    result = restarted.run([], now=now())
    restarted.publisher.close()
    assert result.published.added == (sha,)
    assert [e.adapter_sha256 for e in audit_registry(registry).report.entries] == [sha]


def test_auto_enrol_admits_a_new_key_but_never_a_revoked_one(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:1])
    keys = [key_files.load_private_key(server_key / signing.PRIVATE_KEY_NAME)]
    with open_publisher(registry, keys, None) as publisher:
        publisher.revoke_client(signing.fingerprint(clients[0].public), "key leaked")
        publisher.publish()
    round_ = runner(registry, server_key, auto_enrol=True)
    result = round_.run(
        [Submission(1, clients[0].files()), Submission(2, clients[1].files())], now=now()
    )
    round_.publisher.close()
    assert [(v.status, v.reason) for v in result.verdicts] == [
        ("rejected", "revoked_key"),
        ("admitted", ""),
    ]
    report = audit_registry(registry).report
    assert (report.clients, report.revoked, len(report.entries)) == (1, 1, 1)


def test_stale_submission_rejected_by_the_configured_age(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:1])
    round_ = runner(registry, server_key)
    round_.max_age = timedelta(seconds=0)
    result = round_.run([Submission(1, clients[0].files())], now=now() + timedelta(minutes=1))
    round_.publisher.close()
    assert (result.verdicts[0].status, result.verdicts[0].reason) == ("rejected", "stale")


def test_reply_naming_another_key_than_the_signature_is_refused(
    tmp_path: Path, server_key: Path, clients: list[Client]
) -> None:
    registry = new_registry(tmp_path, server_key, clients[:1])
    round_ = runner(registry, server_key)
    sub = Submission(1, clients[0].files(), public_key=clients[1].public)
    result = round_.run([sub], now=now())
    round_.publisher.close()
    assert (result.verdicts[0].status, result.verdicts[0].reason) == ("rejected", "key_mismatch")
    assert not ReplayStore(state_dir_for(registry)).path.exists()
