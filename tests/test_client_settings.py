"""Joining with the fewest node settings, and what the operator learns when one is wrong.

A node needs only ``data-dir`` and ``signing-key``; the adapter is named after the data folder
(as `seqr client train` names it), even when the app's run config carries the declared
default ``adapter-name = ""``. A missing or unusable setting is refused before any work, and
the reply names the setting and the problem, never its value, a path or file contents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from tiny import copy_texts, tiny_model_dir

from seqr.core.federation import FederationConfig
from seqr.core.key_files import write_keypair
from seqr.core.manifest import verify_export_files
from seqr.core.signing import PRIVATE_KEY_NAME
from seqr.node.client_app import app
from seqr.sim.flower_local import run_config_defaults

SECRET = "SECRET-folder-7c1d"  # part of every local path: must never reach the server
FED = FederationConfig(
    base_model=str(tiny_model_dir()), lora_rank=4, train_steps=3, train_batch_size=2,
    train_seq_len=32, calib_max_sequences=4, lora_target_modules=("q_proj", "v_proj"),
)  # fmt: skip


def _message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )  # fmt: skip
    return Message(content, metadata=metadata)


def _train(node_config: dict, run_config: dict | None = None) -> Message:
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=run_defaults() if run_config is None else run_config)  # fmt: skip
    return app(_message(RecordDict({"federation": ConfigRecord(FED.to_run_config())})), context)


def run_defaults() -> dict:
    """What `flwr run .` gives every node: pyproject's declared defaults (all "" for nodes)."""
    return run_config_defaults()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(SECRET)
    data = copy_texts(root / "my notes", ("bisect.py", "heapq.py"))
    write_keypair(root / "keys")
    return {"root": root, "data": data, "key": root / "keys" / PRIVATE_KEY_NAME}


def test_node_joins_with_only_data_dir_and_signing_key(node, tmp_path):
    progress = tmp_path / "progress"
    reply = _train({"data-dir": str(node["data"]), "signing-key": str(node["key"]),
                    "progress-dir": str(progress)})  # fmt: skip
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    manifest = verify_export_files(dict(reply.content["export"]))
    assert manifest.name == "my-notes"  # the data folder's name, made manifest-safe
    # Its own progress file: stages and losses, nothing private.
    text = (progress / "my-notes.json").read_text()
    state = json.loads(text)
    assert state["stage"] == "submitted" and state["steps"] == 3 and len(state["losses"]) == 3
    assert SECRET not in text and "bisect" not in text and str(node["root"]) not in text


@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"signing-key": "KEY"}, "node setting data-dir is not set"),
        ({"data-dir": "DATA"}, "node setting signing-key is not set"),
        ({"data-dir": "DATA", "signing-key": ""}, "node setting signing-key is not set"),
        ({"data-dir": "DATA/nope", "signing-key": "KEY"},
         "node setting data-dir does not name a readable folder"),
        ({"data-dir": "DATA", "signing-key": "DATA"},
         "node setting signing-key does not name a key file"),
        ({"data-dir": "DATA", "signing-key": "KEY", "adapter-name": "../x"},
         "node setting adapter-name must be"),
        ({"data-dir": "DATA", "signing-key": "KEY", "signing-key-passphrase-env": "NO_SUCH_VAR"},
         "node setting signing-key-passphrase-env names an environment variable"),
    ],
)  # fmt: skip
def test_bad_node_setting_reaches_the_operator_named_without_its_value(node, settings, reason):
    values = {"DATA": str(node["data"]), "KEY": str(node["key"])}
    config = {k: v.replace("DATA", values["DATA"]).replace("KEY", values["KEY"])
              for k, v in settings.items()}  # fmt: skip
    reply = _train(config)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason.startswith(reason)
    assert SECRET not in reply.error.reason and "my notes" not in reply.error.reason


def test_operator_cannot_choose_where_a_real_node_writes(node, tmp_path):
    """progress-dir from the run config (the operator's) counts only in simulation."""
    target = tmp_path / "chosen-by-operator"
    run_config = {**run_defaults(), "progress-dir": str(target)}
    reply = _train({"data-dir": str(node["data"]), "signing-key": str(node["key"])}, run_config)
    assert not reply.has_error()
    assert not target.exists()


def test_progress_dir_comes_from_the_operator_only_in_simulation() -> None:
    """Where a node WRITES is the node's own choice: a real node ignores a progress-dir in the
    run config (the operator's), a simulated one (partition-id set) takes it."""
    from types import SimpleNamespace

    from seqr.node.settings import NodeSettings

    run = {"progress-dir": "/tmp/operator-chosen", "cache-dir": "/tmp/cache", "work-dir": ""}
    real = NodeSettings.from_context(SimpleNamespace(node_config={}, run_config=run))
    assert real.progress_dir is None and real.cache_dir == "/tmp/cache" and real.work_dir is None
    simulated = SimpleNamespace(node_config={"partition-id": 1}, run_config=run)
    settings = NodeSettings.from_context(simulated)
    assert settings.progress_dir == "/tmp/operator-chosen" and settings.partition_id == 1
    assert set(NodeSettings.names()) <= set(run_config_defaults())  # declared to Flower
