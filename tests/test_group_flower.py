"""A task group end to end through Flower: 3 tiny clients federate one adapter over 2 rounds
(FedAvg of B only), a fourth keeps the single-client registry flow; the registry's own audit
verifies the server-signed group adapter and every client's signed contribution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import build_tiny_llama, copy_texts

from seqr.core import key_files, signing
from seqr.core.base_model import load_base_model
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME
from seqr.operator.federation_setup import setup_federation
from seqr.operator.registry_ops import init_registry, open_publisher
from seqr.operator.settings import federation_from_run_config, state_dir_for
from seqr.registry.audit import audit_registry
from seqr.sim.flower_local import flwr_run, local_superlink
from seqr.sim.groups_eval import write_group_app

FEDERATION = {"lora-rank": 4, "lora-alpha": 8, "train-steps": 3, "train-batch-size": 4,
              "train-seq-len": 32, "calib-max-sequences": 8}  # fmt: skip
PARTS = {"g_part0": ("bisect.py",), "g_part1": ("heapq.py",), "g_part2": ("textwrap.py",),
         "solo": ("colorsys.py", "keyword.py")}  # fmt: skip


@pytest.mark.flower
def test_group_of_three_federates_one_audited_adapter_over_two_rounds(tmp_path: Path) -> None:
    # Prepare: tiny model, 4 data partitions with keys, every key enrolled.
    model = build_tiny_llama(tmp_path / "tiny-llama")
    data, keys = tmp_path / "data", tmp_path / "keys"
    fingerprints = {}
    for name, files in PARTS.items():
        copy_texts(data / name, files)
        fingerprints[name] = key_files.write_keypair(keys / name)
    # Slots are bound to the members' keys (name@fingerprint), never to names alone.
    slots = ",".join(f"{n}@{fingerprints[n]}" for n in ("g_part0", "g_part1", "g_part2"))
    key_files.write_keypair(tmp_path / "server-key")
    server_keys = [key_files.load_private_key(tmp_path / "server-key" / PRIVATE_KEY_NAME)]
    fed = federation_from_run_config({**FEDERATION, "base-model": str(model)})
    base = load_base_model(str(model))
    setup = setup_federation(fed, base.model, base.sha256)
    registry = tmp_path / "registry"
    init_registry(registry, server_keys, setup=setup)
    with open_publisher(registry, server_keys, None) as publisher:
        for name in PARTS:
            publisher.enrol_client(key_files.load_public_key(keys / name / PUBLIC_KEY_NAME))
        publisher.publish()
    run_config = {**FEDERATION, "base-model": str(model), "registry-dir": str(registry),
                  "server-keys": str(tmp_path / "server-key"), "data-dir": str(data),
                  "signing-key": str(keys), "min-nodes": 4, "train-timeout-s": 240.0,
                  "task-groups": f"g:{slots}", "num-group-rounds": 2,
                  "group-local-steps": 2, "group-timeout-s": 240.0,
                  # The tiny random model's group adapter on near-identical parts has gain std
                  # ~5x below the probe's; this test is about the group, not plausibility.
                  "max-sigma-ratio": 10.0, "max-mean-z-above": 1000.0}  # fmt: skip
    app = write_group_app(tmp_path / "app")
    # Execute: one real Flower run on a private SuperLink.
    with local_superlink(tmp_path / "work") as link:
        flwr_run(link, app, run_config, {"num-supernodes": 4, "client-resources-num-cpus": 1},
                 timeout_s=400, log=tmp_path / "flwr.log")  # fmt: skip
    # Assert: the audit verifies both adapters and lists who contributed to the group's.
    report = audit_registry(registry).report
    by_name = {e.name: e for e in report.entries}
    assert sorted(by_name) == ["g", "solo"]
    members = {signing.fingerprint(key_files.load_public_key(keys / n / PUBLIC_KEY_NAME))
               for n in ("g_part0", "g_part1", "g_part2")}  # fmt: skip
    assert set(by_name["g"].contributors) == members and by_name["g"].group_rounds == 2
    server = signing.fingerprint(signing.public_key_bytes(server_keys[0]))
    assert by_name["g"].client == server  # signed by the server
    assert by_name["solo"].contributors == ()
    summary = json.loads((state_dir_for(registry) / "groups" / "g.json").read_text())
    assert summary["status"] == "admitted"
    b_bytes = sum(m.d_out * 4 * 4 for m in setup.modules)  # r = 4, float32
    assert summary["b_bytes"] == b_bytes
    for r in summary["rounds"]:
        assert len(r["accepted"]) == 3 and r["bytes_down_per_client"] == b_bytes
        assert set(r["bytes_up_per_client"].values()) == {b_bytes}
        assert sum(r["weights"].values()) == pytest.approx(1.0)  # the server's shares
        # Honest updates stay inside Adam's own bound of 3.16 lr per entry and step (Kingma &
        # Ba 2015, Sec. 2.1), which the server's bound (4 lr) leaves room above.
        adam = r["max_update_norm"] * 0.1 / 0.001**0.5 / 4
        assert 0 < max(r["update_norms"].values()) <= adam
