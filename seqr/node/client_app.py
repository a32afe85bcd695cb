"""Flower ClientApp (Message API): train privately, reply with the signed export only.

TRAIN message in: a ConfigRecord ``federation`` (FederationConfig.to_run_config()).
Node settings (``--node-config``, else the run config): ``data-dir`` and ``signing-key``
(required), ``adapter-name``, ``cache-dir``, ``work-dir`` (keeps checkpoints across rounds),
``signing-key-passphrase-env``. In simulation ``partition-id`` picks the partition-id-th
subfolder (sorted) of ``data-dir``; if ``signing-key`` is a folder, the key is
``<signing-key>/<subfolder>/signing_key.pem``.

Reply: exactly two ConfigRecords. ``export``: the five export files as bytes, by file name.
``public-key``: ``{"spki-der": the signing key's DER public key}``. Nothing else: no text,
token ids, gradients, optimizer state or local paths (tests/test_client_privacy.py). On failure
the reply is an Error whose reason names only the error class and a fixed hint, because Flower
would otherwise send ``str(exception)`` (which may name private files) to the server; details go
to the node log.
Heavy imports (torch, transformers) happen inside the handler. Task-group handlers
(``query.group``, ``train.group``, ``query.group_stats``): seqr/node/group_app.py.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from seqr.core.errors import ConfigError, DataError, KeyFileError, ModelError, SeqrError
from seqr.core.federation import FederationConfig
from seqr.core.signing import PRIVATE_KEY_NAME

FEDERATION_RECORD = "federation"
EXPORT_RECORD = "export"
PUBLIC_KEY_RECORD = "public-key"
PUBLIC_KEY_FIELD = "spki-der"  # seqr.core.signing.public_key_bytes
VERDICT_RECORD = "verdict"
CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode
_HINTS = {  # what a failed node may tell the server: the class of problem, nothing private
    ConfigError: "node or federation settings rejected",
    DataError: "the node's private data is unusable",
    ModelError: "base model missing or its hash differs from the federation's",
    KeyFileError: "the node's signing key is unusable",
}

log = logging.getLogger("seqr.client.app")
app = ClientApp()


def _setting(context: Context, key: str) -> str | None:
    value = context.node_config.get(key, context.run_config.get(key))
    return None if value is None else str(value)


def node_inputs(context: Context) -> tuple[Path, Path, str | None]:
    """(data folder, signing key file, adapter name) from node settings (see module doc)."""
    data, key = _setting(context, "data-dir"), _setting(context, "signing-key")
    if data is None or key is None:
        raise ConfigError("node config needs data-dir and signing-key (--node-config)")
    data_dir, key_path, name = Path(data), Path(key), _setting(context, "adapter-name")
    if "partition-id" in context.node_config:
        pid = int(context.node_config["partition-id"])
        parts = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not 0 <= pid < len(parts):
            raise ConfigError(f"partition-id {pid} but {data_dir} has {len(parts)} subfolders")
        data_dir = parts[pid]
        name = name or data_dir.name
        if key_path.is_dir():
            key_path = key_path / data_dir.name / PRIVATE_KEY_NAME
    return data_dir, key_path, name


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the client pipeline on this node's data; reply with the export's bytes."""
    try:
        fed = FederationConfig.from_run_config(dict(msg.content[FEDERATION_RECORD]))
    except (KeyError, TypeError, ConfigError) as exc:  # the server's config: not private
        return Message(
            Error(CLIENT_APP_RAISED_EXCEPTION, f"bad federation config: {exc}"), reply_to=msg
        )
    try:
        return Message(_train(fed, context), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - every failure must be sanitised before it leaves
        log.exception("client run failed")
        hint = next((h for cls, h in _HINTS.items() if isinstance(exc, cls)), "client run failed")
        kind = type(exc).__name__ if isinstance(exc, SeqrError) else "Exception"
        return Message(Error(CLIENT_APP_RAISED_EXCEPTION, f"{kind}: {hint}"), reply_to=msg)


def _log_progress_to_stderr() -> None:
    """Training runs for minutes inside a Ray actor or SuperNode: show its INFO lines (steps,
    loss) on stderr, which Flower forwards, as the ServerApp does for its own log."""
    logger = logging.getLogger("seqr")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _train(fed: FederationConfig, context: Context) -> RecordDict:
    _log_progress_to_stderr()
    from seqr.core.export_folder import read_export
    from seqr.node.task import run_client  # torch loads here, not at app import

    data_dir, key_path, name = node_inputs(context)
    env = _setting(context, "signing-key-passphrase-env")
    passphrase = os.environ[env].encode() if env and env in os.environ else None
    work = _setting(context, "work-dir")
    with tempfile.TemporaryDirectory(prefix="seqr-client-") as tmp:
        ckpt = Path(work) / f"checkpoints-{fed.fingerprint()[:16]}" if work else None
        run = run_client(data_dir, key_path, Path(tmp) / "export", fed, name=name,
                         passphrase=passphrase, cache_dir=_setting(context, "cache-dir"),
                         checkpoint_dir=ckpt, progress=False)  # fmt: skip
        files = read_export(run.out_dir)
    return RecordDict(
        {
            EXPORT_RECORD: ConfigRecord(dict(files)),
            PUBLIC_KEY_RECORD: ConfigRecord({PUBLIC_KEY_FIELD: run.manifest.public_key_bytes}),
        }
    )


@app.query("verdict")
def verdict(msg: Message, context: Context) -> Message:
    """Log the server's admission verdict for this node's submission; reply empty."""
    record = msg.content.config_records.get(VERDICT_RECORD, ConfigRecord())
    log.info("server verdict: %s", {k: v for k, v in record.items() if not isinstance(v, bytes)})
    return Message(RecordDict(), reply_to=msg)


# Task groups (seqr/node/group_app.py): clients of one task federate one adapter over rounds.
from seqr.node import group_app  # noqa: E402  (after node_inputs, which it uses)

app.query("group")(group_app.membership)
app.train("group", mods=[group_app.contribution_mod, group_app.clip_if_asked])(group_app.train)
app.query("group_stats")(group_app.statistics)
