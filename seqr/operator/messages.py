"""The ServerApp's side of the message protocol (record and field names as client_app.py).

Server -> node, message type ``train``: ConfigRecord ``federation`` (exactly
FederationConfig.to_run_config(), hashes filled in: the client parses it strictly) and
ConfigRecord ``round`` (server-round, registry-version, probe-sha256, probe-tokens; for logs).
Node -> server, the reply: ConfigRecord ``export`` (file name -> bytes, the five export files)
and ConfigRecord ``public-key`` (``spki-der``: the DER public key), or an Error.
Server -> node, message type ``query.verdict``: ConfigRecord ``verdict`` (status, reason,
message, adapter-sha256, client, registry-version, server-round); the node replies empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict

from seqr.core.federation import FederationConfig
from seqr.operator.round import Submission, Verdict

__all__ = [
    "FEDERATION_RECORD",
    "ROUND_RECORD",
    "EXPORT_RECORD",
    "PUBLIC_KEY_RECORD",
    "PUBLIC_KEY_FIELD",
    "VERDICT_RECORD",
    "VERDICT_MESSAGE_TYPE",
    "train_content",
    "submission_from_reply",
    "submissions_from_replies",
    "verdict_content",
]

FEDERATION_RECORD = "federation"
ROUND_RECORD = "round"
EXPORT_RECORD = "export"
PUBLIC_KEY_RECORD = "public-key"
PUBLIC_KEY_FIELD = "spki-der"  # as client_app.py
VERDICT_RECORD = "verdict"
VERDICT_MESSAGE_TYPE = "query.verdict"  # the ClientApp's @app.query("verdict")


def train_content(fed: FederationConfig, round_info: Mapping[str, int | str]) -> RecordDict:
    return RecordDict(
        {
            FEDERATION_RECORD: ConfigRecord(dict(fed.to_run_config())),
            ROUND_RECORD: ConfigRecord(dict(round_info)),
        }
    )


def submission_from_reply(node_id: int, reply: Message) -> Submission:
    """A reply -> Submission; an error reply or a malformed one is a failed submission."""
    if reply.has_error():
        return Submission.failed(node_id, f"error {reply.error.code}: {reply.error.reason}")
    records = reply.content.config_records
    if EXPORT_RECORD not in records:
        return Submission.failed(node_id, f"reply holds no {EXPORT_RECORD!r} record")
    files = dict(records[EXPORT_RECORD])
    odd = sorted(str(k)[:64] for k, v in files.items() if not isinstance(v, bytes))
    if odd:
        return Submission.failed(node_id, f"export record values {odd} are not bytes")
    key = records.get(PUBLIC_KEY_RECORD, ConfigRecord()).get(PUBLIC_KEY_FIELD)
    public_key = key if isinstance(key, bytes) else None
    return Submission(node_id, files=files, public_key=public_key)  # type: ignore[arg-type]


def submissions_from_replies(
    node_ids: Iterable[int], replies: Iterable[Message]
) -> list[Submission]:
    """One Submission per node asked; a node without a reply timed out."""
    by_node = {r.metadata.src_node_id: r for r in replies}
    return [
        submission_from_reply(n, by_node[n]) if n in by_node else Submission.failed(n, "timeout")
        for n in node_ids
    ]


def verdict_content(verdict: Verdict, server_round: int) -> RecordDict:
    return RecordDict(
        {
            VERDICT_RECORD: ConfigRecord(
                {
                    "status": verdict.status,
                    "reason": verdict.reason,
                    "message": verdict.message[:2000],
                    "adapter-sha256": verdict.adapter_sha256,
                    "client": verdict.client,
                    "registry-version": verdict.registry_version,
                    "server-round": server_round,
                }
            )
        }
    )
