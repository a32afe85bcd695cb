"""A real deployment on loopback, as README's "Deployment" section runs it: flower-superlink with
TLS and SuperNode authentication, SuperNodes with registered node keys, `flwr run`, then the
registry's own audit. Faults: a SuperNode killed mid-round, a restarted ServerApp, a node whose
key was never registered. One SuperLink and three SuperNodes serve the whole module
(tests/_deployment.py); every process started is stopped by its PID in a finally.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _deployment import CLIENT_FILES, Deployment, Node, has_clientapp, make_deployment
from tiny import tiny_model_dir

from seqr.consumer.router import RegistryRouter
from seqr.operator.round import ReplayStore
from seqr.operator.settings import state_dir_for
from seqr.registry import audit_registry, pull_registry
from seqr.registry.serve import RegistryServer
from seqr.sim.flower_local import descendants

pytestmark = [pytest.mark.flower, pytest.mark.timeout(600)]
SUPERNODE_CONNECTION_ERROR = 305  # flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR


@dataclass
class Federation:
    deployment: Deployment
    nodes: list[Node]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    deployment = make_deployment(root, tiny_model_dir())
    try:
        deployment.start_superlink()
        nodes = [deployment.new_node(f"node{i}", CLIENT_FILES[i]) for i in range(3)]
        deployment.register(*nodes)  # operator: flwr supernode register node.pub deploy
        for node in nodes:
            deployment.start_supernode(node)
        yield Federation(deployment, nodes)
    finally:
        deployment.stop_all()  # SuperNodes, then the SuperLink, each by PID


def finish(
    deployment: Deployment, process: subprocess.Popen[str], log: Path, timeout: float = 400
) -> str:
    """Wait for `flwr run`; its output, after checking the run completed (a Flower pitfall:
    `flwr run --stream` exits 0 even when the ServerApp crashed)."""
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert deployment.run_status() == "finished:completed", output[-3000:]
    return output


@dataclass
class Round:
    registry: Path
    server_key: Path
    output: str


@pytest.fixture(scope="module")
def first_round(federation: Federation) -> Round:
    """Operator: server key, `seqr server init --federation fed.toml`, enrol the three clients'
    signing keys; then one `flwr run`."""
    dep = federation.deployment
    folder = dep.root / "first"
    registry, key = dep.new_registry(folder, federation.nodes)
    log = folder / "flwr-run.log"
    output = finish(dep, dep.run(registry, key, min_nodes=3, log=log), log)
    return Round(registry, key, output)


def test_a_round_over_tls_with_authenticated_supernodes_publishes_an_auditable_registry(
    federation: Federation, first_round: Round
) -> None:
    assert first_round.output.count("admitted  adapter") == 3, first_round.output[-3000:]
    assert "verdicts acknowledged by 3 of 3 node(s)" in first_round.output
    # A client pulls what was published over HTTP (python-tuf's client), as any client does.
    server = RegistryServer(first_round.registry, quiet=True).start()
    try:
        mirror = first_round.registry.parent / "client-mirror"
        report = pull_registry(server.url, mirror).report  # 1 (init), 2 (enrol), 3 (round)
    finally:
        server.shutdown()
    assert (report.version, report.clients) == (3, 3)
    assert sorted(e.name for e in report.entries) == ["node0", "node1", "node2"]
    # And it can use the mirror it pulled (seqr route's Python API).
    router = RegistryRouter.open(mirror, trusted_state=mirror / ".seqr",
                                 base_model=str(tiny_model_dir()))  # fmt: skip
    (result,) = router.route(["def bisect_left(a, x):"])
    assert result.adapter in {"node0", "node1", "node2"} and result.runner_up is not None


def test_a_restarted_serverapp_continues_from_the_stored_registry(
    federation: Federation, first_round: Round, tmp_path: Path
) -> None:
    dep = federation.deployment
    # Prepare: a copy of the first round's registry and server state, audited once (trusted).
    registry = tmp_path / "registry"
    shutil.copytree(first_round.registry, registry)
    shutil.copytree(state_dir_for(first_round.registry), state_dir_for(registry))
    trusted = tmp_path / "trusted"
    before = audit_registry(registry, trusted).report
    seen_before = ReplayStore(state_dir_for(registry)).load().manifest_hashes
    # Execute: a second `flwr run` starts a new ServerApp on the same registry.
    log = tmp_path / "flwr-run.log"
    output = finish(dep, dep.run(registry, first_round.server_key, min_nodes=3, log=log), log)
    # Assert: the nodes retrained the same weights, which the registry already lists (refused
    # as duplicates); the restarted server re-signed the timestamp only; history consistent.
    assert output.count("rejected duplicate_adapter") >= 3, output[-3000:]
    after = audit_registry(registry, trusted).report  # rollback / fork checks against `before`
    assert (after.first_use, after.trusted_version_before) == (False, before.version)
    assert after.version == before.version and after.tree_size == before.tree_size
    assert after.expires > before.expires
    old = {e.adapter_sha256 for e in before.entries}
    assert old == {e.adapter_sha256 for e in after.entries}
    assert seen_before <= ReplayStore(state_dir_for(registry)).load().manifest_hashes
    assert "verdicts acknowledged by 3 of 3 node(s)" in output, output[-3000:]


def test_a_supernode_killed_mid_round_leaves_the_others_published(
    federation: Federation, tmp_path: Path
) -> None:
    dep, nodes = federation.deployment, federation.nodes
    registry, key = dep.new_registry(tmp_path, nodes)
    victim = nodes[2]
    log = tmp_path / "flwr-run.log"
    run = dep.run(registry, key, min_nodes=3, log=log)
    try:
        # Execute: once the victim runs its ClientApp (it has the train message), kill -9
        # the whole SuperNode: no reply, no goodbye; the SuperLink notices the missing
        # heartbeats and answers for it (Flower: NODE_UNAVAILABLE).
        assert victim.process is not None
        deadline = time.monotonic() + 300
        while not has_clientapp(victim.process):
            assert time.monotonic() < deadline and run.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        for pid in descendants(victim.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output = finish(dep, run, log)
    finally:
        dep.stop(victim.process)
        dep.start_supernode(victim)  # back for the other tests (its key stays registered)
    # Assert: the round completed with the two others; their adapters are published.
    assert output.count("admitted  adapter") == 2, output[-3000:]
    assert re.search(r"failed\s+(client_error|timeout)", output), output[-3000:]
    report = audit_registry(registry).report
    assert sorted(e.name for e in report.entries) == ["node0", "node1"]


def test_a_supernode_with_an_unregistered_key_is_refused(federation: Federation) -> None:
    dep = federation.deployment
    stranger = dep.new_node("stranger", CLIENT_FILES[3])  # its node key is never registered
    process = dep.start_supernode(stranger, "--max-retries", "1")
    try:
        code = process.wait(timeout=120)
    finally:
        dep.stop(process)
    assert stranger.log is not None
    text = stranger.log.read_text(errors="replace")
    # flower-supernode reports Flower's exit code 305 in its log (the process itself exits 1
    # through uvicorn's shutdown); "[code: 2004] Failed to activate SuperNode" is the
    # SuperLink's refusal of the unknown key, sent back over TLS.
    assert code != 0, text[-2000:]
    assert f"Exit Code: {SUPERNODE_CONNECTION_ERROR}" in text, text[-2000:]
    assert "Failed to activate SuperNode" in text, text[-2000:]
    superlink_log = (dep.root / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log
