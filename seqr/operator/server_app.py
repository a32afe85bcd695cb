"""Flower ServerApp (Message API, custom loop): collect signed adapters, admit, publish.

Per round: send every connected node a ``train`` message carrying the federation settings;
check each reply as it arrives (admission checks and the plausibility probe; what passes is
staged) and log its verdict with a count and an ETA (a node that fails or times out gets its
own verdict and does not stop the round); then publish the next signed registry version
(seqr/operator/round.py) and tell each node that replied its verdict in a ``query.verdict``
message. Record names: seqr/operator/messages.py.

Run config: the ServerSettings keys (seqr/operator/settings.py: registry-dir and server-keys are
required) plus the federation keys (FederationConfig, kebab-case), or a TOML file of them
named by ``federation-file``. With ``task-groups`` set (seqr/operator/groups.py), the members
of each group first federate one group adapter (seqr/operator/group_loop.py), which the
first registry round publishes; the registry rounds then run for the other nodes. The
registry must exist (``seqr server init``); a restarted ServerApp continues from the stored
registry and replay state.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import torch  # noqa: F401  # flwr's ArrayRecord conversions need torch imported in-process
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from seqr.operator.group_loop import run_groups, server_signing_key
from seqr.operator.groups import GroupSettings
from seqr.operator.messages import (
    VERDICT_MESSAGE_TYPE,
    submission_from_reply,
    train_content,
    verdict_content,
)
from seqr.operator.round import RoundResult, RoundRunner, Submission
from seqr.operator.round_progress import RoundProgress, stream_replies
from seqr.operator.settings import ServerSettings, federation_from_run_config
from seqr.operator.startup import start_server

log = logging.getLogger("seqr.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The custom loop: num-server-rounds rounds of collect / admit / publish / verdicts."""
    _log_to_console()
    settings = ServerSettings.from_run_config(context.run_config)
    fed = federation_from_run_config(context.run_config)
    groups = GroupSettings.from_run_config(context.run_config)
    runner = start_server(settings, fed)
    try:
        grouped: set[int] = set()  # task-group members federate their group's adapter instead
        if groups.enabled:
            nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait_s)
            grouped = run_groups(
                grid, runner, settings, groups, nodes, server_signing_key(settings)
            )
        for server_round in range(1, settings.num_server_rounds + 1):
            result = run_round(grid, runner, settings, server_round, exclude=grouped)
            _summarise(server_round, result)
    finally:
        runner.publisher.close()


def run_round(
    grid: Grid,
    runner: RoundRunner,
    settings: ServerSettings,
    server_round: int,
    exclude: set[int] | frozenset[int] = frozenset(),
) -> RoundResult:
    nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait_s)
    nodes = [n for n in nodes if n not in exclude]
    info: dict[str, int | str] = {
        "server-round": server_round,
        "registry-version": runner.publisher.version,
        "probe-sha256": runner.probe.text_sha256,
        "probe-tokens": runner.probe.tokens,
    }
    fed = runner.setup.federation  # with the base model and shared A hashes filled in
    messages = [
        Message(train_content(fed, info), dst_node_id=n, message_type=MessageType.TRAIN)
        for n in nodes
    ]
    log.info("round %d: asking %d node(s) for their adapters", server_round, len(nodes))
    # Each reply is checked and logged as it arrives (seqr/operator/round_progress.py).
    open_round, progress = runner.begin(), RoundProgress(server_round, len(nodes))
    for reply in stream_replies(grid, messages, timeout_s=settings.train_timeout_s):
        node = reply.metadata.src_node_id
        if node in nodes and node not in open_round.verdicts:
            verdict = open_round.check(submission_from_reply(node, reply), now=datetime.now(UTC))
            log.info("%s", progress.line(verdict))
    for node in nodes:
        if node not in open_round.verdicts:
            verdict = open_round.check(Submission.failed(node, "timeout"), now=datetime.now(UTC))
            log.info("%s", progress.line(verdict))
    log.info("%s", progress.summary())
    result = open_round.finish(now=datetime.now(UTC))
    # Nodes that timed out may still be training: they are not waited for a second time.
    answered = [v for v in result.verdicts if v.reason != "timeout"]
    verdicts = [
        Message(verdict_content(v, server_round), dst_node_id=v.node_id,
                message_type=VERDICT_MESSAGE_TYPE)
        for v in answered
    ]  # fmt: skip
    acks = list(grid.send_and_receive(verdicts, timeout=settings.verdict_timeout_s))
    acked = sum(1 for a in acks if not a.has_error())
    log.info("round %d: verdicts acknowledged by %d of %d node(s)", server_round, acked,
             len(verdicts))  # fmt: skip
    return result


def wait_for_nodes(grid: Grid, min_nodes: int, wait_s: float) -> list[int]:
    """Connected node ids, waiting up to ``wait_s`` seconds for ``min_nodes`` of them."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if len(nodes) < min_nodes:
        log.warning("only %d of min-nodes %d connected after %.0f s", len(nodes), min_nodes, wait_s)
    return nodes


def _summarise(server_round: int, result: RoundResult) -> None:
    p = result.published
    log.info(
        "round %d: registry version %d, %d adapter(s), %d new; tree %d, root %s",
        server_round, p.version, p.entries, len(p.added), p.tree_size, p.tree_root[:16],
    )  # fmt: skip
    for v in result.verdicts:
        log.info("  node %d: %-8s %-18s %s", v.node_id, v.status, v.reason or "-", v.message)


def _log_to_console() -> None:
    logger = logging.getLogger("seqr")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
