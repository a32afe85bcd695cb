"""A group member on the tiny model: partial statistics merge exactly into the pooled ones,
and the ClientApp's group replies carry B only, signed, as the server checks them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from tiny import copy_texts, tiny_model_dir

from seqr.core.base_model import load_base_model
from seqr.core.errors import AdmissionError
from seqr.core.federation import FederationConfig
from seqr.core.key_files import load_private_key, write_keypair
from seqr.core.signing import PRIVATE_KEY_NAME, generate_private_key, public_key_bytes
from seqr.core.textdata import read_text_folder, tokenize_chunks
from seqr.node.calibrate import calibrate
from seqr.node.client_app import app
from seqr.node.train import make_lora_model
from seqr.operator.group_replies import Expected, Member, check_statistics, check_update
from seqr.registry.contributions import (
    SignedContribution,
    arrays_sha256,
    merge_partial_statistics,
    record_digest,
    round_digest,
    verify_membership,
)

FED = FederationConfig(
    base_model=str(tiny_model_dir()), lora_rank=4, train_batch_size=2, train_seq_len=32,
    calib_max_sequences=10_000, calib_max_tokens=10**7, lora_target_modules=("q_proj", "v_proj"),
)  # fmt: skip
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
B_NAMES = sorted(f"base_model.model.{m}.lora_B.weight" for m in MODULES)


def test_merged_partial_statistics_equal_the_pooled_statistics(tmp_path: Path) -> None:
    # Prepare: a LoRA with a non-zero B and three clients' chunks of unequal size.
    base = load_base_model(FED.base_model)
    peft_model, _ = make_lora_model(base.model, FED)
    gen = np.random.default_rng(1)
    for name, param in peft_model.named_parameters():
        if ".lora_B." in name:
            param.data.copy_(param.data.new_tensor(gen.standard_normal(tuple(param.shape))))
    texts = read_text_folder(copy_texts(tmp_path / "text", ("bisect.py", "colorsys.py")))
    chunks = tokenize_chunks(texts, base.tokenizer, FED.train_seq_len)
    parts = np.split(chunks, [len(chunks) // 5, len(chunks) // 2])
    # Execute: each client measures its own part; the server merges (Chan et al.).
    partials = {
        f"client{i}": calibrate(peft_model, part, FED, progress=False).stats.to_json_bytes()
        for i, part in enumerate(parts)
    }
    merged = merge_partial_statistics(partials)
    pooled = calibrate(peft_model, chunks, FED, progress=False).stats
    # Assert: the same count, mean and M2 per module as one pass over the pooled data.
    assert set(merged.modules) == set(pooled.modules) == set(MODULES)
    for module, moments in pooled.modules.items():
        assert merged.modules[module].count == moments.count  # the same measured tokens
        assert moments.count <= chunks.size - len(chunks)  # never a chunk's first token
        np.testing.assert_allclose(merged.modules[module].mean, moments.mean, rtol=1e-10)
        np.testing.assert_allclose(merged.modules[module].m2, moments.m2, rtol=1e-9)
    assert len({p for p in partials.values()}) == 3  # the parts really differ


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("group-node")
    copy_texts(root / "data" / "g_part0", ("bisect.py",))
    write_keypair(root / "keys" / "g_part0")
    return root


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )  # fmt: skip
    return Message(content, metadata=metadata)


def _context(root: Path) -> Context:
    config = {"data-dir": str(root / "data"), "signing-key": str(root / "keys"), "partition-id": 0}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _group_content(
    b: dict[str, np.ndarray], rnd: int, previous: tuple[str, ...] = ()
) -> RecordDict:
    config = {**FED.to_run_config(), "group-name": "g", "group-session": "ab" * 16,
              "group-round": rnd, "group-rounds": 2, "group-local-steps": 2,
              "group-previous-updates": ",".join(previous)}  # fmt: skip
    arrays = ArrayRecord({k: Array(v) for k, v in b.items()})
    return RecordDict({"arrays": arrays, "config": ConfigRecord(config)})


def test_group_replies_carry_only_b_signed_as_the_server_checks(node: Path) -> None:
    key = load_private_key(node / "keys" / "g_part0" / PRIVATE_KEY_NAME)
    member = Member(7, "g_part0", public_key_bytes(key))
    shapes = {name: (64 if "q_proj" in name else 32, 4) for name in B_NAMES}
    zeros = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    # Membership: the adapter name (the data subfolder), the public key and the signed proof
    # of holding it for this challenge; nothing else.
    challenge = "c0" * 16
    query = RecordDict({"group-query": ConfigRecord({"challenge": challenge})})
    who = app(_message(query, "query.group"), _context(node))
    record = who.content.config_records["group-member"]
    assert set(record) == {"adapter-name", "public-key", "proof", "signature"}
    assert record["adapter-name"] == "g_part0" and record["public-key"] == member.public_key
    proof = verify_membership(SignedContribution(record["proof"], record["signature"]),
                              challenge, 7, "proof")  # fmt: skip
    assert (proof.adapter_name, proof.client_key) == ("g_part0", member.public_key)
    # Train one round from B = 0.
    reply = app(_message(_group_content(zeros, 1), "train.group"), _context(node))
    assert not reply.has_error(), reply.error
    assert set(reply.content.array_records) == {"arrays"}
    assert list(reply.content.array_records["arrays"].keys()) == B_NAMES  # B only, never A
    assert set(reply.content.config_records) == {"contribution"}
    parent = round_digest(arrays_sha256(zeros), ())  # the node computes it from what it got
    expected = Expected("g", "ab" * 16, 1, arrays_sha256(zeros), shapes, parent)
    signed, b, _ = check_update(reply.content, member, expected)
    assert any(np.abs(v).max() > 0 for v in b.values())  # it trained
    # The server refuses the same reply against another round or with a changed B.
    with pytest.raises(AdmissionError, match="replayed or started from another model"):
        check_update(
            reply.content, member, Expected("g", "ab" * 16, 2, expected.base_sha256, shapes)
        )
    tampered = reply.content.array_records["arrays"]
    tampered[B_NAMES[0]] = Array(np.ones(shapes[B_NAMES[0]], np.float32))
    with pytest.raises(AdmissionError, match="not the B the node signed"):
        check_update(reply.content, member, expected)
    # Statistics of the final B, signed over the exact bytes, with the round chain's last link.
    averaged = (record_digest(signed),)
    stats = app(_message(_group_content(b, 2, averaged), "query.group_stats"), _context(node))
    assert not stats.has_error(), stats.error
    final = Expected("g", "ab" * 16, 2, arrays_sha256(b), shapes,
                     round_digest(arrays_sha256(b), averaged))  # fmt: skip
    _, data, count = check_statistics(stats.content, member, final)
    assert count > 0 and b'"modules"' in data
    other = Member(7, "g_part0", public_key_bytes(generate_private_key()))  # another key
    with pytest.raises(AdmissionError, match="key_mismatch|declared"):
        check_statistics(stats.content, other, final)
