"""End to end through Flower: our own SuperLink (simulation), `flwr run` with 3 simulated
SuperNodes training the tiny model, then the registry's own audit of what was published.

The Flower plumbing (private SuperLink, app folder, `flwr run`, shutdown by PID) is the one
`seqr simulate` uses: seqr/sim/flower_local.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import build_tiny_llama, copy_texts

from seqr.core import key_files
from seqr.core.base_model import load_base_model
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
from seqr.operator.federation_setup import setup_federation
from seqr.operator.registry_ops import init_registry, open_publisher
from seqr.operator.round import ReplayStore
from seqr.operator.settings import federation_from_run_config, state_dir_for
from seqr.registry.audit import audit_registry
from seqr.sim.flower_local import flwr_run, local_superlink, write_app

FEDERATION = {  # the federation keys of the run config (tiny and fast)
    "lora-rank": 4,
    "lora-alpha": 8,
    "train-steps": 4,
    "train-batch-size": 4,
    "train-seq-len": 32,
    "calib-max-sequences": 8,
}


@pytest.mark.flower
def test_flower_run_admits_enrolled_clients_and_publishes_an_auditable_registry(
    tmp_path: Path,
) -> None:
    # Prepare: tiny model, 3 data partitions with their keys, a registry with 2 enrolled.
    model = build_tiny_llama(tmp_path / "tiny-llama")
    data, keys = tmp_path / "data", tmp_path / "keys"
    for i, names in enumerate([("bisect.py", "heapq.py"), ("textwrap.py",), ("colorsys.py",)]):
        copy_texts(data / f"p{i}", names)
        key_files.write_keypair(keys / f"p{i}")
    key_files.write_keypair(tmp_path / "server-key")
    server_keys = [key_files.load_private_key(tmp_path / "server-key" / PRIVATE_KEY_NAME)]
    base = load_base_model(str(model))
    fed = federation_from_run_config({**FEDERATION, "base-model": str(model)})
    registry = tmp_path / "registry"
    init_registry(registry, server_keys, setup=setup_federation(fed, base.model, base.sha256))
    with open_publisher(registry, server_keys, None) as publisher:
        for i in (0, 1):  # p2 is not enrolled: its adapter must be refused
            publisher.enrol_client(key_files.load_public_key(keys / f"p{i}" / PUBLIC_KEY_NAME))
        publisher.publish()
    run_config = {
        **FEDERATION,
        "registry-dir": registry,
        "server-keys": tmp_path / "server-key",
        "base-model": model,
        "data-dir": data,
        "signing-key": keys,
        "train-timeout-s": 240.0,
    }
    log = tmp_path / "flwr-run.log"
    # Execute (flwr_run raises unless `flwr ls` reports the run finished:completed)
    with local_superlink(tmp_path) as link:
        status = flwr_run(link, write_app(tmp_path / "app"), run_config,
                          {"num-supernodes": 3, "client-resources-num-cpus": 1},
                          timeout_s=240, log=log)  # fmt: skip
        superlink_pid = link.process.pid
    output = log.read_text()
    # Assert: the run completed and the SuperLink it started is gone.
    assert status == "finished:completed"
    assert not Path(f"/proc/{superlink_pid}").exists()
    assert output.count("admitted  adapter") == 2 and "rejected unknown_key" in output
    assert "verdicts acknowledged by 3 of 3 node(s)" in output, output[-3000:]
    # Each reply is logged as it arrives, with a count (and an ETA while some are missing).
    for k in (1, 2, 3):
        assert f"round 1: reply {k} of 3 from node" in output
    assert "2 to come, ETA" in output and "all replies in" in output
    report = audit_registry(registry).report
    assert (report.version, report.clients) == (3, 2)
    assert sorted(e.name for e in report.entries) == ["p0", "p1"]
    seen = ReplayStore(state_dir_for(registry)).load()
    assert len(seen.manifest_hashes) == 2
