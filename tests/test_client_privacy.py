"""The ClientApp's reply holds the signed adapter export and the public key, and nothing else."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from safetensors.numpy import load as load_safetensors
from tiny import copy_texts, tiny_model_dir

from seqr.core.federation import FederationConfig
from seqr.core.key_files import write_keypair
from seqr.core.manifest import verify_export_files
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_BYTES
from seqr.core.stats import NormStatistics
from seqr.node.client_app import app

CANARY = "CANARY-private-3b9f1e"  # appears in the private data; must never appear in the reply
FED = FederationConfig(
    base_model=str(tiny_model_dir()), lora_rank=4, train_steps=2, train_batch_size=2,
    train_seq_len=32, calib_max_sequences=4, a_seed=3, lora_target_modules=("q_proj", "v_proj"),
)  # fmt: skip
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def _message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    # A Message made outside a runtime needs its metadata given explicitly (otherwise Flower
    # reads run and node ids from flwr.supercore.task_identity.TaskIdentity).
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )  # fmt: skip
    return Message(content, metadata=metadata)


def _context(node_config: dict[str, str | int]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("node")
    data = root / "data"
    for domain in ("code", "diary"):
        copy_texts(data / domain, ("bisect.py",))
        (data / domain / "secret.txt").write_text((CANARY + " my bank PIN is 4921.\n") * 40)
        write_keypair(root / "keys" / domain)
    return {"root": root, "data": data, "keys": root / "keys"}


@pytest.fixture(scope="module")
def reply(node: dict[str, Path]) -> Message:
    msg = _message(RecordDict({"federation": ConfigRecord(FED.to_run_config())}))
    config = {"data-dir": str(node["data"]), "signing-key": str(node["keys"]), "partition-id": 1}
    return app(msg, _context(config))


def test_reply_holds_only_the_export_and_the_public_key(
    reply: Message, node: dict[str, Path]
) -> None:
    assert not reply.has_error()
    content = reply.content
    assert list(content.keys()) == ["export", "public-key"]
    assert len(content.array_records) == 0 and len(content.metric_records) == 0
    export = dict(content["export"])
    assert sorted(export) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "norm_stats.json",
         "manifest.json", "model.sig"]
    )  # fmt: skip
    assert all(isinstance(v, bytes) for v in export.values())
    assert dict(content["public-key"]).keys() == {"spki-der"}
    public = content["public-key"]["spki-der"]
    assert isinstance(public, bytes) and len(public) == PUBLIC_KEY_BYTES

    manifest = verify_export_files(export)  # signature and every file hash
    assert manifest.public_key_bytes == public and manifest.name == "diary"  # partition 1

    tensors = load_safetensors(export["adapter_model.safetensors"])
    expected = {}
    for module in MODULES:
        d_out = 64 if "q_proj" in module else 32  # tiny Llama: 4 heads x 16, 2 kv heads x 16
        expected[f"base_model.model.{module}.lora_A.weight"] = (4, 64)
        expected[f"base_model.model.{module}.lora_B.weight"] = (d_out, 4)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert all(v.dtype == np.float32 for v in tensors.values())

    stats = NormStatistics.from_json_bytes(export["norm_stats.json"])
    assert sorted(stats.modules) == sorted(MODULES)
    config = json.loads(export["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_reply_leaks_no_text_paths_or_training_state(reply: Message, node: dict[str, Path]) -> None:
    blobs = list(dict(reply.content["export"]).values())
    for blob in blobs:
        assert CANARY.encode() not in blob and b"bank PIN" not in blob
        assert str(node["root"]).encode() not in blob  # no local paths
        for word in (b"exp_avg", b"optimizer", b"grad", b"input_ids", b"loss"):
            assert word not in blob
    header = json.loads(reply.content["export"]["adapter_config.json"])
    assert header["base_model_name_or_path"] == "tiny-llama"


def test_failure_reply_names_no_private_file(node: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "data" / "only"
    bad.mkdir(parents=True)
    (bad / f"{CANARY}.txt").write_bytes(b"\xff\xfe not utf-8")
    msg = _message(RecordDict({"federation": ConfigRecord(FED.to_run_config())}))
    key = node["keys"] / "code" / PRIVATE_KEY_NAME
    out = app(
        msg, _context({"data-dir": str(bad.parent), "signing-key": str(key), "partition-id": 0})
    )
    assert out.has_error() and not out.has_content()
    assert out.error.reason == "DataError: the node's private data is unusable"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_bad_federation_config_is_reported(node: dict[str, Path]) -> None:
    msg = _message(RecordDict({"federation": ConfigRecord({"lora-rank": 0})}))
    out = app(msg, _context({"data-dir": str(node["data"]), "signing-key": "x"}))
    assert out.has_error() and "lora-rank = 0" in out.error.reason
