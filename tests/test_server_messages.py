"""The ServerApp's message records agree with the ClientApp's, both ways."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, Metadata, RecordDict
from tiny import tiny_model_dir

import seqr.node.client_app as client_app
from seqr.core.federation import FederationConfig
from seqr.operator import messages
from seqr.operator.round import Verdict

FED = FederationConfig(base_model=str(tiny_model_dir()), lora_rank=4, a_sha256="ab" * 32)


def _metadata(message_type: str, src: int = 0, dst: int = 7) -> Metadata:
    return Metadata(
        run_id=1, message_id="m1", src_node_id=src, dst_node_id=dst, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type=message_type,
    )  # fmt: skip


def _reply(node: int, content: RecordDict | None = None, error: Error | None = None) -> Message:
    md = _metadata(MessageType.TRAIN, src=node, dst=0)
    if error is not None:
        return Message(error=error, metadata=md)
    return Message(content, metadata=md)


def test_record_names_are_the_client_apps() -> None:
    for name in (
        "FEDERATION_RECORD", "EXPORT_RECORD", "PUBLIC_KEY_RECORD", "PUBLIC_KEY_FIELD",
        "VERDICT_RECORD",
    ):  # fmt: skip
        assert getattr(messages, name) == getattr(client_app, name), name


def test_train_content_parses_strictly_as_the_client_does() -> None:
    content = messages.train_content(FED, {"server-round": 2, "probe-sha256": "00"})
    # The client refuses unknown keys: the federation record holds exactly the federation.
    assert FederationConfig.from_run_config(dict(content["federation"])) == FED
    assert content["round"]["server-round"] == 2


def test_replies_become_submissions_and_missing_ones_time_out() -> None:
    files = {"manifest.json": b"{}", "model.sig": b"{}"}
    ok = RecordDict(
        {
            "export": ConfigRecord(files),
            "public-key": ConfigRecord({"spki-der": b"\1" * 91}),
        }
    )
    odd = RecordDict({"export": ConfigRecord({"manifest.json": "text, not bytes"})})
    replies = [
        _reply(1, ok),
        _reply(2, error=Error(2, "DataError: the node's private data is unusable")),
        _reply(3, RecordDict({"something": ConfigRecord({"x": 1})})),
        _reply(4, odd),
    ]
    subs = {s.node_id: s for s in messages.submissions_from_replies([1, 2, 3, 4, 5], replies)}
    assert subs[1].files == files and subs[1].public_key == b"\1" * 91
    assert subs[2].files is None and "private data is unusable" in subs[2].error
    assert subs[3].files is None and "no 'export' record" in subs[3].error
    assert subs[4].files is None and "not bytes" in subs[4].error
    assert (subs[5].files, subs[5].error) == (None, "timeout")


def test_the_client_app_accepts_and_acknowledges_a_verdict() -> None:
    verdict = Verdict(7, "rejected", "implausible_stats", "claimed std too small", client="x")
    content = messages.verdict_content(verdict, server_round=1)
    record = content["verdict"]
    assert (record["status"], record["reason"], record["server-round"]) == (
        "rejected", "implausible_stats", 1,
    )  # fmt: skip
    msg = Message(content, metadata=_metadata(messages.VERDICT_MESSAGE_TYPE))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    ack = client_app.app(msg, context)
    assert not ack.has_error()
