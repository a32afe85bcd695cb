"""Flower ClientApp (Message API): train privately, reply with the signed export only.

TRAIN message in: a ConfigRecord ``federation`` (FederationConfig.to_run_config()).
Node settings (``--node-config``, else the run config; an empty value counts as unset):
``data-dir`` and ``signing-key`` (required), ``adapter-name`` (default: the data folder's
name, as ``seqr client train`` does), ``cache-dir``, ``work-dir`` (keeps checkpoints across
rounds), ``signing-key-passphrase-env``, ``progress-dir`` (a folder where the node writes its
progress file, seqr/node/progress.py; read from the node's own config only, except in
simulation, so an operator never chooses where a real node writes). In simulation
``partition-id`` picks the partition-id-th subfolder (sorted) of ``data-dir``; if
``signing-key`` is a folder, the key is ``<signing-key>/<subfolder>/signing_key.pem``.
A setting that is missing or unusable is refused before any work, and the server is told
which setting and why (NodeSettingError: the setting's name and a fixed reason, never its
value, a path or file contents).

Reply: exactly two ConfigRecords. ``export``: the five export files as bytes, by file name.
``public-key``: ``{"spki-der": the signing key's DER public key}``. Nothing else: no text,
token ids, gradients, optimizer state or local paths (tests/test_client_privacy.py). On failure
the reply is an Error whose reason is a fixed hint for the class of problem (or a
NodeSettingError's fixed text), because Flower would otherwise send ``str(exception)`` (which
may name private files) to the server; details go to the node log.
Heavy imports (torch, transformers) happen inside the handler. Task-group handlers
(``query.group``, ``train.group``, ``query.group_stats``): seqr/node/group_app.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from seqr.core.errors import ConfigError, DataError, KeyFileError, ModelError, SeqrError
from seqr.core.federation import FederationConfig
from seqr.core.signing import PRIVATE_KEY_NAME
from seqr.node.progress import NodeProgress

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


class NodeSettingError(ConfigError):
    """A node setting that is missing or unusable. Its message is built from fixed text and
    the setting's name only, so it may travel to the server as it is."""


def _setting(context: Context, key: str) -> str | None:
    value = context.node_config.get(key, context.run_config.get(key))
    return None if value is None or str(value) == "" else str(value)


def _node_only_setting(context: Context, key: str) -> str | None:
    """A setting that says where the node WRITES: its own --node-config only, or the run
    config in simulation (partition-id set), where operator and nodes are one machine."""
    value = context.node_config.get(key)
    if value is None and "partition-id" in context.node_config:
        value = context.run_config.get(key)
    return None if value is None or str(value) == "" else str(value)


def node_inputs(context: Context) -> tuple[Path, Path, str | None]:
    """(data folder, signing key file, adapter name) from node settings (see module doc)."""
    data, key = _setting(context, "data-dir"), _setting(context, "signing-key")
    if data is None or key is None:
        setting = "data-dir" if data is None else "signing-key"
        raise NodeSettingError(
            f"node setting {setting} is not set; the node passes it with "
            f"--node-config '{setting}=\"...\"'"
        )
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


def check_node_settings(context: Context) -> tuple[Path, Path, str, bytes | None]:
    """(data folder, key file, adapter name, passphrase): every node setting checked before
    any work, each failure a NodeSettingError naming the setting (module doc)."""
    from seqr.node.export import check_adapter_name, default_name

    data_dir, key_path, name = node_inputs(context)
    if not data_dir.is_dir():
        raise NodeSettingError("node setting data-dir does not name a readable folder")
    if not key_path.is_file():
        raise NodeSettingError("node setting signing-key does not name a key file")
    try:
        name = check_adapter_name(name if name is not None else default_name(data_dir))
    except ConfigError:
        raise NodeSettingError(
            "node setting adapter-name must be 1-128 characters of A-Z a-z 0-9 . _ - and "
            "start with a letter or digit"
        ) from None
    env = _setting(context, "signing-key-passphrase-env")
    if env is not None and env not in os.environ:
        raise NodeSettingError(
            "node setting signing-key-passphrase-env names an environment variable that is "
            "not set in the SuperNode's environment"
        )
    return data_dir, key_path, name, None if env is None else os.environ[env].encode()


def failure_reason(exc: BaseException) -> str:
    """What a failed node may tell the server: a NodeSettingError's own text, else the fixed
    hint for the class of problem. Nothing private (module doc)."""
    if isinstance(exc, NodeSettingError):
        return str(exc)
    hint = next((h for cls, h in _HINTS.items() if isinstance(exc, cls)), "client run failed")
    kind = type(exc).__name__ if isinstance(exc, SeqrError) else "Exception"
    return f"{kind}: {hint}"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the client pipeline on this node's data; reply with the export's bytes."""
    try:
        fed = FederationConfig.from_run_config(dict(msg.content[FEDERATION_RECORD]))
    except (KeyError, TypeError, ConfigError) as exc:  # the server's config: not private
        return Message(
            Error(CLIENT_APP_RAISED_EXCEPTION, f"bad federation config: {exc}"), reply_to=msg
        )
    folder = _node_only_setting(context, "progress-dir")
    progress = NodeProgress(None if folder is None else Path(folder), _progress_name(context))
    try:
        return Message(_train(fed, context, progress), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - every failure must be sanitised before it leaves
        log.exception("client run failed")
        reason = failure_reason(exc)
        with contextlib.suppress(OSError, SeqrError):
            progress.stage("failed", reason)
        return Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def _progress_name(context: Context) -> str:
    """The name the progress file goes by: the adapter name when the settings give one (in
    simulation the data subfolder's), else the node id."""
    from seqr.node.export import check_adapter_name, default_name

    try:
        data_dir, _, name = node_inputs(context)
        return check_adapter_name(name if name is not None else default_name(data_dir))
    except (OSError, ValueError, SeqrError):
        return f"node-{context.node_id}"


def _log_progress_to_stderr(quiet: bool) -> None:
    """Training runs for minutes inside a Ray actor or SuperNode: show its INFO lines (steps,
    loss) on stderr, which Flower forwards, as the ServerApp does for its own log. With a
    progress file (``quiet``) only warnings: whoever watches follows the file instead."""
    logger = logging.getLogger("seqr")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _train(fed: FederationConfig, context: Context, progress: NodeProgress) -> RecordDict:
    _log_progress_to_stderr(quiet=progress.folder is not None)
    data_dir, key_path, name, passphrase = check_node_settings(context)
    from seqr.core.export_folder import read_export
    from seqr.node.task import run_client  # torch loads here, not at app import

    work = _setting(context, "work-dir")
    with tempfile.TemporaryDirectory(prefix="seqr-client-") as tmp:
        ckpt = Path(work) / f"checkpoints-{fed.fingerprint()[:16]}" if work else None
        run = run_client(data_dir, key_path, Path(tmp) / "export", fed, name=name,
                         passphrase=passphrase, cache_dir=_setting(context, "cache-dir"),
                         checkpoint_dir=ckpt, progress=False, tracker=progress)  # fmt: skip
        files = read_export(run.out_dir)
    progress.stage("submitted")
    return RecordDict(
        {
            EXPORT_RECORD: ConfigRecord(dict(files)),
            PUBLIC_KEY_RECORD: ConfigRecord({PUBLIC_KEY_FIELD: run.manifest.public_key_bytes}),
        }
    )


@app.query("verdict")
def verdict(msg: Message, context: Context) -> Message:
    """Log the server's admission verdict for this node's submission (and note it in the
    progress file); reply empty."""
    record = msg.content.config_records.get(VERDICT_RECORD, ConfigRecord())
    log.info("server verdict: %s", {k: v for k, v in record.items() if not isinstance(v, bytes)})
    status, reason, message = (str(record.get(k, "")) for k in ("status", "reason", "message"))
    folder = _node_only_setting(context, "progress-dir")
    # "failed": the node wrote its own reason when it failed; the server's adds nothing.
    if folder is not None and status in ("admitted", "rejected"):
        with contextlib.suppress(OSError, SeqrError):
            progress = NodeProgress.resume(Path(folder), _progress_name(context))
            progress.stage(status, "" if status == "admitted" else f"{reason}: {message}")
    return Message(RecordDict(), reply_to=msg)


# Task groups (seqr/node/group_app.py): clients of one task federate one adapter over rounds.
from seqr.node import group_app  # noqa: E402  (after node_inputs, which it uses)

app.query("group")(group_app.membership)
app.train("group", mods=[group_app.contribution_mod, group_app.clip_if_asked])(group_app.train)
app.query("group_stats")(group_app.statistics)
