"""The ServerApp's group flow: membership, FedAvg rounds on B, exact statistics, publication.

For each task group (seqr/operator/groups.py), with a fresh random session nonce:

1. ``query.group`` to every node: adapter name + public key; the members of each group are
   the nodes whose adapter name it lists and whose key the registry allows.
2. ``num-group-rounds`` rounds: Flower's strategy configures ``train`` messages for the
   group's nodes (re-typed ``train.group``) carrying only B (ArrayRecord ``arrays``) and the
   settings; each reply is checked (seqr/operator/group_replies.py) and the good ones are averaged
   by ``strategy.aggregate_train`` (FedAvg weighted by example counts, a robust rule, or
   FedAvg under a DP wrapper that clips and adds noise).
3. ``query.group_stats`` with the final B: each member measures its partial statistics on
   its own data and signs them; the server merges them exactly (Chan et al.).
4. The server builds and signs the group export (seqr/operator/group_export.py), runs the same
   plausibility probe as for any adapter, and stages it in the registry; the next publish
   (the registry round that follows) lists it with its contributors.

A summary (bytes per round per client, losses, privacy spent) is written to
``<state-dir>/groups/<group>.json``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from seqr.core.admission import check_stats_plausible
from seqr.core.atomic_write import write_atomic
from seqr.core.errors import AdmissionError, KeyFileError, SeqrError
from seqr.core.signing import PRIVATE_KEY_NAME, SigningKeyFile, check_public_key
from seqr.operator.group_export import build_group_export
from seqr.operator.group_replies import Expected, Member, check_statistics, check_update
from seqr.operator.groups import GroupSettings, NodeSubset, make_strategy
from seqr.operator.messages import PUBLIC_KEY_FIELD
from seqr.operator.round import RoundRunner
from seqr.operator.settings import ServerSettings
from seqr.registry.contributions import (
    ContributionsFile,
    SignedContribution,
    arrays_sha256,
    merge_partial_statistics,
)
from seqr.registry.store import ensure_dir

__all__ = ["GroupOutcome", "discover_members", "run_group", "run_groups", "server_signing_key"]

log = logging.getLogger("seqr.server.groups")
MEMBER_RECORD = "group-member"


@dataclass
class RoundLog:
    round: int
    accepted: list[int]  # node ids whose update was averaged
    rejected: dict[str, str]  # node id -> reason
    bytes_down_per_client: int  # raw tensor bytes of B sent to each member
    bytes_up_per_client: dict[str, int]  # node id -> raw tensor bytes of the B it sent
    array_record_bytes_down: int  # the same with Flower's array serialisation (npy headers)
    train_loss: float  # weighted mean of the members' local training losses
    epsilon: float | None = None  # DP: cumulative epsilon at group-dp-delta after this round


@dataclass
class GroupOutcome:
    group: str
    session: str
    members: dict[str, str]  # node id -> adapter name
    status: str = "failed"  # admitted | rejected | failed
    reason: str = ""
    adapter_sha256: str = ""
    b_bytes: int = 0  # raw bytes of B (all modules): what travels per direction and round
    a_bytes: int = 0  # raw bytes of the shared A: never sent
    rounds: list[RoundLog] = field(default_factory=list)
    heldout_loss: dict[str, float] = field(default_factory=dict)  # node id -> own held-out
    privacy: str = "none"
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def server_signing_key(settings: ServerSettings) -> SigningKeyFile:
    """The first server key: it signs group adapters (a root key, as audit requires)."""
    from seqr.operator.startup import _passphrase

    passphrase = _passphrase(settings.server_key_passphrase_env)
    return SigningKeyFile.open(settings.key_dirs[0] / PRIVATE_KEY_NAME, passphrase)


def _is_public_key(key: object) -> bool:
    try:
        check_public_key(key)  # type: ignore[arg-type]
    except KeyFileError:
        return False
    return True


def discover_members(
    grid: Any,
    nodes: Sequence[int],
    groups: Mapping[str, tuple[str, ...]],
    allowed: set[str] | None,
    timeout_s: float,
) -> dict[str, list[Member]]:
    """Group name -> members (by node id); ``allowed`` key ids (None: any key)."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.group") for n in nodes]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    owner = {name: group for group, names in groups.items() for name in names}
    claims: dict[str, list[Member]] = {}
    for reply in replies:
        if reply.has_error():
            continue
        record = reply.content.config_records.get(MEMBER_RECORD, ConfigRecord())
        name, key = record.get("adapter-name"), record.get(PUBLIC_KEY_FIELD)
        if isinstance(name, str) and name in owner and _is_public_key(key):
            claims.setdefault(name, []).append(Member(reply.metadata.src_node_id, name, key))
    members: dict[str, list[Member]] = {g: [] for g in groups}
    for name, claimants in sorted(claims.items()):
        if len(claimants) > 1:
            log.warning("adapter name %r is claimed by nodes %s: left out of group %s", name,
                        [c.node_id for c in claimants], owner[name])  # fmt: skip
            continue
        member = claimants[0]
        if allowed is not None and member.client not in allowed:
            log.warning("node %d (%s) signs with %s, not enrolled: left out of group %s",
                        member.node_id, name, member.client, owner[name])  # fmt: skip
            continue
        members[owner[name]].append(member)
    return {g: sorted(m, key=lambda x: x.node_id) for g, m in members.items()}


def run_groups(
    grid: Any,
    runner: RoundRunner,
    settings: ServerSettings,
    groups: GroupSettings,
    nodes: Sequence[int],
    server_key: Any,
) -> set[int]:
    """Every group of the run config; returns the node ids that took part in one."""
    document = runner.publisher.document
    allowed = None if runner.publisher.config.auto_enrol else set(document.clients)
    members = discover_members(grid, nodes, groups.groups, allowed, settings.verdict_timeout_s)
    taken: set[int] = set()
    for group, group_members in members.items():
        taken |= {m.node_id for m in group_members}
        if len(group_members) < 2:
            log.warning("group %s: %d member(s) connected; it needs >= 2", group,
                        len(group_members))  # fmt: skip
            continue
        outcome = run_group(grid, runner, settings, groups, group, group_members, server_key)
        log.info("group %s: %s %s %s", group, outcome.status, outcome.reason,
                 outcome.adapter_sha256[:16])  # fmt: skip
    return taken


def run_group(
    grid: Any,
    runner: RoundRunner,
    settings: ServerSettings,
    gs: GroupSettings,
    group: str,
    members: list[Member],
    server_key: Any,
) -> GroupOutcome:
    started = time.perf_counter()
    setup = runner.setup
    fed, rank = setup.federation, setup.federation.lora_rank
    shapes = {m.b_tensor: (m.d_out, rank) for m in setup.modules}
    by_node = {m.node_id: m for m in members}
    outcome = GroupOutcome(
        group, secrets.token_hex(16), {str(n): m.adapter_name for n, m in by_node.items()}
    )
    outcome.b_bytes = sum(d * r * 4 for d, r in shapes.values())
    outcome.a_bytes = sum(m.d_in * rank * 4 for m in setup.modules)
    current = {name: np.zeros(shape, np.float32) for name, shape in sorted(shapes.items())}
    globals_ = [arrays_sha256(current)]
    strategy = make_strategy(gs, len(members))
    signed: list[SignedContribution] = []
    try:
        for rnd in range(1, gs.num_group_rounds + 1):
            config = _config(fed, group, outcome.session, rnd, gs)
            expected = Expected(group, outcome.session, rnd, globals_[-1], shapes)
            arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
            messages = list(
                strategy.configure_train(rnd, arrays, config, NodeSubset(grid, list(by_node)))
            )
            for message in messages:
                message.metadata.message_type = "train.group"
            replies = list(grid.send_and_receive(messages, timeout=gs.group_timeout_s))
            good, round_log = _check_round(replies, by_node, expected, arrays)
            aggregated, metrics = strategy.aggregate_train(rnd, [r for r, _ in good])
            if aggregated is None:
                raise AdmissionError(
                    "aggregation_failed", f"round {rnd}: no aggregate ({round_log.rejected})"
                )
            current = {k: np.asarray(aggregated[k].numpy(), np.float32) for k in sorted(shapes)}
            globals_.append(arrays_sha256(current))
            signed += [s for _, s in good]
            round_log.train_loss = float((metrics or {}).get("train-loss", float("nan")))
            spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
            round_log.epsilon = None if spent is None else float(spent.epsilon)
            outcome.rounds.append(round_log)
            log.info("group %s round %d: %d/%d updates averaged, loss %.4f, %d B bytes per client "
                     "each way%s", group, rnd, len(good), len(by_node), round_log.train_loss,
                     round_log.bytes_down_per_client,
                     "" if spent is None else f", epsilon {spent.epsilon:.3f}")  # fmt: skip
        outcome.privacy = _privacy(gs, strategy)
        stats_signed, partials, examples = _statistics(
            grid, by_node, gs, fed, outcome, current, globals_[-1], shapes
        )
        merged = merge_partial_statistics(partials)
        contributions = ContributionsFile(
            group=group, session=outcome.session, rounds=gs.num_group_rounds,
            aggregation=gs.describe_aggregation(), privacy=outcome.privacy,
            globals=tuple(globals_), contributions=tuple(signed + stats_signed),
            statistics=partials,
        )  # fmt: skip
        files = build_group_export(setup, current, merged.to_json_bytes(), contributions,
                                   server_key, example_count=examples)  # fmt: skip
        try:
            check_stats_plausible(merged, runner.probe.norms(current), **runner.bounds)
        except SeqrError as exc:
            raise AdmissionError("implausible_stats", str(exc)) from None
        outcome.adapter_sha256 = runner.publisher.stage_adapter(files, admitted=datetime.now(UTC))
        outcome.status = "admitted"
    except AdmissionError as exc:
        outcome.status, outcome.reason = "rejected", f"{exc.reason}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a group must never stop the server
        log.exception("group %s failed", group)
        outcome.status, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
    outcome.seconds = round(time.perf_counter() - started, 2)
    folder = settings.state_path / "groups"
    ensure_dir(folder)
    write_atomic(folder / f"{group}.json", json.dumps(outcome.to_json(), indent=1).encode())
    return outcome


def _config(fed: Any, group: str, session: str, rnd: int, gs: GroupSettings) -> ConfigRecord:
    return ConfigRecord(
        {
            **fed.to_run_config(),
            "group-name": group,
            "group-session": session,
            "group-round": rnd,
            "group-rounds": gs.num_group_rounds,
            "group-local-steps": gs.group_local_steps,
        }
    )


def _check_round(
    replies: list[Message], by_node: Mapping[int, Member], expected: Expected, sent: ArrayRecord
) -> tuple[list[tuple[Message, SignedContribution]], RoundLog]:
    good, rejected, up = [], {}, {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in by_node:
            continue
        if reply.has_error():
            rejected[str(node)] = f"client_error: {reply.error.reason}"
            continue
        try:
            contribution, b = check_update(reply.content, by_node[node], expected)
        except AdmissionError as exc:
            rejected[str(node)] = f"{exc.reason}: {exc}"
            continue
        up[str(node)] = sum(int(v.nbytes) for v in b.values())
        good.append((reply, contribution))
    answered = {r.metadata.src_node_id for r in replies}
    rejected.update({str(n): "timeout" for n in by_node if n not in answered})
    for node_id, reason in rejected.items():
        log.warning("group %s round %d: node %s left out: %s", expected.group, expected.round,
                    node_id, reason)  # fmt: skip
    round_log = RoundLog(
        round=expected.round,
        accepted=sorted(r.metadata.src_node_id for r, _ in good),
        rejected=rejected,
        bytes_down_per_client=sum(int(a.numpy().nbytes) for a in sent.values()),
        bytes_up_per_client=up,
        array_record_bytes_down=sum(len(a.data) for a in sent.values()),
        train_loss=float("nan"),
    )
    return good, round_log


def _statistics(
    grid: Any,
    by_node: Mapping[int, Member],
    gs: GroupSettings,
    fed: Any,
    outcome: GroupOutcome,
    final: Mapping[str, np.ndarray],
    final_sha: str,
    shapes: Mapping[str, tuple[int, int]],
) -> tuple[list[SignedContribution], dict[str, bytes], int]:
    config = _config(fed, outcome.group, outcome.session, gs.num_group_rounds, gs)
    expected = Expected(outcome.group, outcome.session, gs.num_group_rounds, final_sha, shapes)
    messages = [
        Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in final.items()}),
                            "config": config}),
                dst_node_id=n, message_type="query.group_stats")
        for n in by_node
    ]  # fmt: skip
    replies = grid.send_and_receive(messages, timeout=gs.group_timeout_s)
    signed, partials, examples = [], {}, 0
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in by_node or reply.has_error():
            log.warning("group %s: node %s sent no statistics", outcome.group, node)
            continue
        try:
            record, stats, count = check_statistics(reply.content, by_node[node], expected)
        except AdmissionError as exc:
            log.warning("group %s: statistics of node %s refused: %s", outcome.group, node, exc)
            continue
        signed.append(record)
        partials[by_node[node].client] = stats
        examples += count
        loss = reply.content.metric_records.get("metrics", {}).get("heldout-loss")
        if isinstance(loss, float):
            outcome.heldout_loss[str(node)] = loss
    if not partials:
        raise AdmissionError("no_statistics", "no member sent valid partial statistics")
    return signed, partials, examples


def _privacy(gs: GroupSettings, strategy: Any) -> str:
    if gs.group_dp == "none":
        return "none"
    spent = strategy.privacy_spent()
    text = (
        f"client-level DP ({gs.group_dp}-side fixed clipping): clip {gs.group_dp_clip}, "
        f"noise multiplier {gs.group_dp_noise_multiplier}, {gs.num_group_rounds} round(s)"
    )
    if spent is not None:
        text += f"; ({spent.epsilon:.4g}, {spent.delta:g})-DP by {spent.accounting_method}"
    log.info("privacy: %s", text)
    return text
