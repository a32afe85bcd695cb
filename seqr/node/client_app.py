"""Flower ClientApp (Message API): train privately, reply with the signed export only.

TRAIN message in: a ConfigRecord ``federation`` (FederationConfig.to_run_config()).
Node settings: seqr/node/settings.py (``data-dir`` and ``signing-key`` are required; a setting
that is missing or unusable is refused before any work, and the server is told which setting
and why, never its value).

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
import tempfile
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from seqr.core.errors import ConfigError, DataError, KeyFileError, ModelError, SeqrError
from seqr.core.federation import FederationConfig
from seqr.node.progress import NodeProgress
from seqr.node.settings import NodeSettingError, NodeSettings

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
    settings = NodeSettings.from_context(context)
    folder = settings.progress_dir
    name = _progress_name(settings, context.node_id)
    progress = NodeProgress(None if folder is None else Path(folder), name)
    try:
        return Message(_train(fed, settings, progress), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - every failure must be sanitised before it leaves
        log.exception("client run failed")
        reason = failure_reason(exc)
        with contextlib.suppress(OSError, SeqrError):
            progress.stage("failed", reason)
        return Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)


def _progress_name(settings: NodeSettings, node_id: int | None = None) -> str:
    """The name the progress file goes by: the adapter name when the settings give one (in
    simulation the data subfolder's), else the node id."""
    from seqr.node.export import check_adapter_name, default_name

    try:
        data_dir, _, name = settings.inputs()
        return check_adapter_name(name if name is not None else default_name(data_dir))
    except (OSError, ValueError, SeqrError):
        return f"node-{node_id}"


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


def _train(fed: FederationConfig, settings: NodeSettings, progress: NodeProgress) -> RecordDict:
    _log_progress_to_stderr(quiet=progress.folder is not None)
    node = settings.resolve()
    from seqr.core.export_folder import read_export
    from seqr.node.task import run_client  # torch loads here, not at app import

    work = settings.work_dir
    with tempfile.TemporaryDirectory(prefix="seqr-client-") as tmp:
        ckpt = Path(work) / f"checkpoints-{fed.fingerprint()[:16]}" if work else None
        run = run_client(node.data_dir, node.key_path, Path(tmp) / "export", fed, name=node.name,
                         passphrase=node.passphrase, cache_dir=settings.cache_dir,
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
    settings = NodeSettings.from_context(context)
    folder = settings.progress_dir
    # "failed": the node wrote its own reason when it failed; the server's adds nothing.
    if folder is not None and status in ("admitted", "rejected"):
        with contextlib.suppress(OSError, SeqrError):
            progress = NodeProgress.resume(Path(folder), _progress_name(settings, context.node_id))
            progress.stage(status, "" if status == "admitted" else f"{reason}: {message}")
    return Message(RecordDict(), reply_to=msg)


# Task groups (seqr/node/group_app.py): clients of one task federate one adapter over rounds.
from seqr.node import group_app  # noqa: E402  (after _HINTS, which it uses)

app.query("group")(group_app.membership)
app.train("group", mods=[group_app.contribution_mod, group_app.clip_if_asked])(group_app.train)
app.query("group_stats")(group_app.statistics)
