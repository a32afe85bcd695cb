"""The ClientApp's task-group handlers (registered in seqr/node/client_app.py).

Message types (records as seqr/operator/group_loop.py builds them):

- ``query.group``: ConfigRecord ``group-query`` {``challenge``}; the node proves which key it
  holds, so the server can give it the ``task-groups`` slot bound to that key. Reply
  ConfigRecord ``group-member`` {``adapter-name``, ``public-key``, ``proof``, ``signature``}:
  the challenge, name and key signed with that key (contribution_records.sign_membership).
  No data is read.
- ``train.group``: ArrayRecord ``arrays`` (the global B, tensor name -> float32, nothing else)
  and ConfigRecord ``config`` (the federation keys plus ``group-name``, ``group-session``,
  ``group-round``, ``group-rounds``, ``group-local-steps``, ``group-previous-updates``: the
  record digests the B it receives was averaged from). The node trains
  group-local-steps steps (seqr/node/group_train.py) and replies ArrayRecord ``arrays`` (its B),
  MetricRecord ``metrics`` (``num-examples``: its training chunks, the FedAvg weight;
  ``unit-weight``: 1; ``train-loss``) and ConfigRecord ``contribution`` (``record``, the
  signed record's exact bytes, and ``signature``; seqr.registry.contributions). The record
  names, as its parent, the round digest of the B received and those digests, which the
  node computes itself: it signs what it was given, so the rounds form a checkable chain.
  ``contribution_mod`` signs what actually leaves the node: with client-side DP it runs
  after Flower's ``fixedclipping_mod`` has clipped the update.
- ``query.group_stats``: ``arrays`` (the final group B) and ``config``; the node replies
  ConfigRecord ``statistics`` (``norm-stats``: its partial statistics of that adapter on its
  own data, NormStatistics JSON bytes), MetricRecord ``metrics`` (``num-examples``: the
  calibration sequences; ``heldout-loss`` on its own held-out chunks) and ``contribution``.

Failures are sanitised like the registry flow's (client_app._HINTS): only the error class
and a fixed hint reach the server.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from seqr.core.errors import ConfigError, SeqrError
from seqr.core.federation import FederationConfig
from seqr.node.settings import NodeSettings

log = logging.getLogger("seqr.client.group")

MEMBER_RECORD = "group-member"
QUERY_RECORD = "group-query"
PREVIOUS_UPDATES_KEY = "group-previous-updates"
ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
CONTRIBUTION_RECORD = "contribution"
STATISTICS_RECORD = "statistics"
CLIPPING_NORM_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM


def membership(msg: Message, context: Context) -> Message:
    """Adapter name, public key and the signed proof of holding it for the server's
    challenge (no private data is touched)."""
    try:
        from seqr.core.export_folder import check_file_name
        from seqr.core.signing import public_key_bytes
        from seqr.registry.contributions import sign_membership

        data_dir, _, name = NodeSettings.from_context(context).inputs()
        name = name or data_dir.name
        check_file_name(name, where="adapter name")
        query = msg.content.config_records.get(QUERY_RECORD, ConfigRecord())
        challenge = query.get("challenge")
        if not isinstance(challenge, str):
            raise ConfigError("the membership query carries no challenge")
        key = _signing_key(context)
        proof = sign_membership(challenge, int(context.node_id), name, key)
        record = ConfigRecord({"adapter-name": name, "public-key": public_key_bytes(key),
                               "proof": proof.payload, "signature": proof.signature})  # fmt: skip
        return Message(RecordDict({MEMBER_RECORD: record}), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - sanitised below
        return _failure(msg, exc)


def _work_at_global_b(msg: Message, context: Context) -> tuple[dict[str, Any], Any]:
    """(group settings, this node's loaded GroupWork with the message's global B set)."""
    from seqr.node.group_train import load_group_work, set_b

    fed, group = _read_config(msg)
    settings = NodeSettings.from_context(context)
    work = load_group_work(settings.inputs()[0], fed, settings.cache_dir)
    set_b(work.peft_model, _numpy(msg.content[ARRAYS_RECORD]))
    return group, work


def train(msg: Message, context: Context) -> Message:
    """One local round from the global B; reply B, the weight and the mean loss."""
    try:
        from seqr.node.group_train import train_round

        group, work = _work_at_global_b(msg, context)
        incoming = msg.content[ARRAYS_RECORD]
        losses = train_round(work, int(group["group-round"]), int(group["group-local-steps"]))
        b = _b_in_order(work.peft_model, list(incoming.keys()))
        metrics = MetricRecord(
            {
                "num-examples": len(work.train),
                "unit-weight": 1,
                "train-loss": float(np.mean(losses)),
            }
        )
        content = RecordDict({ARRAYS_RECORD: b, METRICS_RECORD: metrics})
        return Message(content, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - sanitised below
        return _failure(msg, exc)


def statistics(msg: Message, context: Context) -> Message:
    """Partial statistics of the final group adapter on this node's data, signed."""
    try:
        from seqr.node.group_train import statistics as measure

        group, work = _work_at_global_b(msg, context)
        incoming = _numpy(msg.content[ARRAYS_RECORD])
        result, loss = measure(work)
        stats = result.stats.to_json_bytes()
        signed = _sign(context, group, "statistics", int(group["group-rounds"]),
                       result.sequences, _sha256(stats), incoming)  # fmt: skip
        metrics = MetricRecord(
            {
                "num-examples": result.sequences,
                "heldout-loss": _finite(loss),
                "heldout-chunks": int(min(len(work.heldout), 32)),
            }  # fmt: skip
        )
        content = RecordDict(
            {
                STATISTICS_RECORD: ConfigRecord({"norm-stats": stats}),
                METRICS_RECORD: metrics,
                CONTRIBUTION_RECORD: signed,
            }
        )
        return Message(content, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - sanitised below
        return _failure(msg, exc)


def contribution_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Sign the update that actually leaves the node (outermost mod of ``train.group``)."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        from seqr.registry.contributions import arrays_sha256

        _, group = _read_config(msg)
        sent = _numpy(reply.content[ARRAYS_RECORD])
        examples = int(reply.content[METRICS_RECORD]["num-examples"])
        base = _numpy(msg.content[ARRAYS_RECORD])
        signed = _sign(context, group, "update", int(group["group-round"]), examples,
                       arrays_sha256(sent), base)  # fmt: skip
        reply.content[CONTRIBUTION_RECORD] = signed
        return reply
    except Exception as exc:  # noqa: BLE001 - sanitised below
        return _failure(msg, exc)


def clip_if_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's fixedclipping_mod when the server's DP wrapper sent a clipping norm
    (group-dp = client); otherwise the update passes unchanged."""
    from flwr.clientapp.mod import fixedclipping_mod

    config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
    if CLIPPING_NORM_KEY in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# ---- helpers ------------------------------------------------------------------------------


def _read_config(msg: Message) -> tuple[FederationConfig, dict[str, Any]]:
    config = dict(msg.content[CONFIG_RECORD])
    fed_keys = set(FederationConfig.keys())
    fed = FederationConfig.from_run_config({k: v for k, v in config.items() if k in fed_keys})
    group = {k: v for k, v in config.items() if k.startswith("group-")}
    for key in ("group-name", "group-session", "group-round", "group-rounds", "group-local-steps",
                PREVIOUS_UPDATES_KEY):  # fmt: skip
        if key not in group:
            raise ConfigError(f"group message has no {key!r}")
    return fed, group


def _numpy(record: Any) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays as float32 numpy (Message content is typed as any record)."""
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}


def _b_in_order(peft_model: Any, keys: list[str]) -> ArrayRecord:
    """B as an ArrayRecord with the server's key order (fixedclipping_mod compares it)."""
    from seqr.node.group_train import get_b

    b = get_b(peft_model)
    return ArrayRecord({k: Array(np.ascontiguousarray(b[k])) for k in keys})


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else -1.0


def _signing_key(context: Context) -> Any:
    from seqr.core.key_files import load_private_key

    settings = NodeSettings.from_context(context)
    _, key_path, _ = settings.inputs()
    env = settings.signing_key_passphrase_env
    passphrase = os.environ[env].encode() if env and env in os.environ else None
    return load_private_key(key_path, passphrase)


def _sign(
    context: Context,
    group: dict[str, Any],
    kind: str,
    server_round: int,
    examples: int,
    sha256: str,
    base: dict[str, np.ndarray],
) -> ConfigRecord:
    from seqr.core.signing import public_key_bytes
    from seqr.registry.contributions import (
        Contribution,
        arrays_sha256,
        round_digest,
        sign_contribution,
    )

    key = _signing_key(context)
    previous = str(group[PREVIOUS_UPDATES_KEY])
    base_sha256 = arrays_sha256(base)
    record = Contribution(
        group=str(group["group-name"]),
        session=str(group["group-session"]),
        kind=kind,  # type: ignore[arg-type]
        round=server_round,
        client_key=public_key_bytes(key),
        example_count=examples,
        sha256=sha256,
        base_sha256=base_sha256,
        # The round digest of what this node received, computed here (not copied).
        parent_sha256=round_digest(base_sha256, [d for d in previous.split(",") if d]),
    )
    signed = sign_contribution(record, key)
    return ConfigRecord({"record": signed.payload, "signature": signed.signature})


def _failure(msg: Message, exc: Exception) -> Message:
    from seqr.node.client_app import _HINTS, CLIENT_APP_RAISED_EXCEPTION

    log.error("group handler failed", exc_info=exc)
    hint = next((h for cls, h in _HINTS.items() if isinstance(exc, cls)), "group step failed")
    kind = type(exc).__name__ if isinstance(exc, SeqrError) else "Exception"
    return Message(Error(CLIENT_APP_RAISED_EXCEPTION, f"{kind}: {hint}"), reply_to=msg)
