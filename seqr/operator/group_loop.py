"""The ServerApp's group flow: membership, FedAvg rounds on B, exact statistics, publication.

For each task group (seqr/operator/groups.py), with a fresh random session nonce:

1. ``query.group`` with a fresh challenge to every node: a node gets a slot only by signing
   the challenge with the slot's enrolled key (seqr/operator/group_membership.py).
2. ``num-group-rounds`` rounds: Flower's strategy configures ``train`` messages for the
   group's nodes (re-typed ``train.group``) carrying only B (ArrayRecord ``arrays``), the
   settings and the previous round's averaged record digests; each reply is checked on its
   own (seqr/operator/group_round.py: signature by the slot's key, the round chain, example
   count, weight and update bounds), the server writes its own FedAvg weight into each good
   one, and ``strategy.aggregate_train`` averages them (FedAvg, a robust rule, or FedAvg
   under a DP wrapper that clips and adds noise). The state advances only from good replies.
3. ``query.group_stats`` with the final B: each member measures its partial statistics on
   its own data and signs them; the server merges them exactly (Chan et al.).
4. The server builds and signs the group export (seqr/operator/group_export.py), checks it
   like any adapter (weight and statistics bounds, the plausibility probe), and stages it in
   the registry; the next publish (the registry round that follows) lists it with its
   contributors.

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

from seqr.core.atomic_write import write_atomic
from seqr.core.errors import AdmissionError, KeyFileError, SeqrError
from seqr.core.key_files import SigningKeyFile
from seqr.core.printable import printable
from seqr.core.signing import PRIVATE_KEY_NAME, check_public_key
from seqr.core.value_bounds import check_statistics
from seqr.operator.group_export import build_group_export
from seqr.operator.group_membership import discover_members
from seqr.operator.group_replies import Expected, Member, UpdateBounds
from seqr.operator.group_replies import check_statistics as check_stats_reply
from seqr.operator.group_round import GroupState, advance, check_round, weigh
from seqr.operator.groups import GroupSettings, NodeSubset, make_strategy
from seqr.operator.round import RoundRunner
from seqr.operator.settings import ServerSettings
from seqr.registry.contributions import (
    PPM,
    ContributionsFile,
    SignedContribution,
    merge_partial_statistics,
)
from seqr.registry.store import ensure_dir

__all__ = ["GroupOutcome", "run_group", "run_groups", "server_signing_key"]

log = logging.getLogger("seqr.server.groups")
PREVIOUS_UPDATES_KEY = "group-previous-updates"  # record digests the B sent was averaged from


@dataclass
class RoundLog:
    round: int
    accepted: list[int]  # node ids whose update was averaged
    rejected: dict[str, str]  # node id -> reason
    bytes_down_per_client: int  # raw tensor bytes of B sent to each member
    bytes_up_per_client: dict[str, int]  # node id -> raw tensor bytes of the B it sent
    array_record_bytes_down: int  # the same with Flower's array serialisation (npy headers)
    train_loss: float  # weighted mean of the members' local training losses
    weights: dict[str, float] = field(default_factory=dict)  # node id -> server's FedAvg share
    update_norms: dict[str, float] = field(default_factory=dict)  # node id -> ||B - B_global||
    max_update_norm: float = 0.0  # the bound those norms were checked against
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
    enrolled = None if runner.publisher.config.auto_enrol else set(document.clients)
    membership = discover_members(
        grid, nodes, groups.groups, enrolled=enrolled, revoked=set(document.revoked),
        timeout_s=settings.verdict_timeout_s,
    )  # fmt: skip
    taken: set[int] = set()
    for group, group_members in membership.members.items():
        taken |= {m.node_id for m in group_members}
        if len(group_members) < 2:
            log.warning("group %s: %d member(s) proved a slot's key; it needs >= 2", group,
                        len(group_members))  # fmt: skip
            continue
        outcome = run_group(grid, runner, settings, groups, group, group_members, server_key)
        log.info("group %s: %s %s %s", group, outcome.status, printable(outcome.reason, 300),
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
    state = GroupState.initial(shapes)
    strategy = make_strategy(gs, len(members))
    # The admission bounds of this server, for the group's B and statistics as for any adapter.
    policy = runner.policy_for({m.public_key.hex() for m in members})
    max_update = gs.max_update_norm(fed.train_lr, sum(d * r for d, r in shapes.values()))
    try:
        for rnd in range(1, gs.num_group_rounds + 1):
            expected = state.expected(group, outcome.session, shapes)
            bounds = UpdateBounds(state.b, max_update, gs.group_max_examples, policy.weight_bounds)
            arrays = ArrayRecord({k: Array(np.array(v)) for k, v in state.b.items()})
            config = _config(fed, group, outcome.session, rnd, gs, state.previous_updates)
            messages = list(
                strategy.configure_train(rnd, arrays, config, NodeSubset(grid, list(by_node)))
            )
            for message in messages:
                message.metadata.message_type = "train.group"
            replies = list(grid.send_and_receive(messages, timeout=gs.group_timeout_s))
            checked = check_round(replies, by_node, expected, bounds)
            shares = weigh(checked.good, gs) if checked.good else []
            aggregated, metrics = strategy.aggregate_train(rnd, [u.reply for u in checked.good])
            if aggregated is None:
                raise AdmissionError(
                    "aggregation_failed", f"round {rnd}: no aggregate ({checked.rejected})"
                )
            aggregate = {k: v.numpy() for k, v in aggregated.items()}
            state = advance(state, aggregate, checked.good, policy.weight_bounds)
            round_log = RoundLog(
                round=rnd,
                accepted=sorted(u.node_id for u in checked.good),
                rejected=checked.rejected,
                bytes_down_per_client=sum(int(a.numpy().nbytes) for a in arrays.values()),
                bytes_up_per_client=checked.bytes_up,
                array_record_bytes_down=sum(len(a.data) for a in arrays.values()),
                train_loss=float((metrics or {}).get("train-loss", float("nan"))),
                weights={str(u.node_id): w for u, w in zip(checked.good, shares, strict=True)},
                update_norms=checked.update_norms,
                max_update_norm=max_update,
            )
            spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
            round_log.epsilon = None if spent is None else float(spent.epsilon)
            outcome.rounds.append(round_log)
            log.info("group %s round %d: %d/%d updates averaged, loss %.4f, %d B bytes per client "
                     "each way%s", group, rnd, len(checked.good), len(by_node),
                     round_log.train_loss, round_log.bytes_down_per_client,
                     "" if spent is None else f", epsilon {spent.epsilon:.3f}")  # fmt: skip
        outcome.privacy = _privacy(gs, strategy)
        stats_signed, partials, examples = _statistics(grid, by_node, gs, fed, outcome, state,
                                                       shapes)  # fmt: skip
        merged = merge_partial_statistics(partials)
        contributions = ContributionsFile(
            group=group, session=outcome.session, rounds=gs.num_group_rounds,
            aggregation=gs.describe_aggregation(), privacy=outcome.privacy,
            globals=state.globals, aggregated=state.aggregated,
            max_examples=gs.group_max_examples,
            max_share_ppm=round(gs.group_max_weight_share * PPM),
            contributions=(*state.signed, *stats_signed), statistics=partials,
        )  # fmt: skip
        try:  # the same bounds and probe as any admitted adapter
            check_statistics(merged, policy.stats_bounds)
            runner.probe.check_claim(merged, state.b, **policy.plausibility)
        except AdmissionError:
            raise
        except SeqrError as exc:
            raise AdmissionError("implausible_stats", str(exc)) from None
        files = build_group_export(setup, state.b, merged.to_json_bytes(), contributions,
                                   server_key, example_count=examples)  # fmt: skip
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


def _config(
    fed: Any, group: str, session: str, rnd: int, gs: GroupSettings, previous: Sequence[str]
) -> ConfigRecord:
    return ConfigRecord(
        {
            **fed.to_run_config(),
            "group-name": group,
            "group-session": session,
            "group-round": rnd,
            "group-rounds": gs.num_group_rounds,
            "group-local-steps": gs.group_local_steps,
            PREVIOUS_UPDATES_KEY: ",".join(previous),
        }
    )


def _statistics(
    grid: Any,
    by_node: Mapping[int, Member],
    gs: GroupSettings,
    fed: Any,
    outcome: GroupOutcome,
    state: GroupState,
    shapes: Mapping[str, tuple[int, int]],
) -> tuple[list[SignedContribution], dict[str, bytes], int]:
    config = _config(fed, outcome.group, outcome.session, gs.num_group_rounds, gs,
                     state.previous_updates)  # fmt: skip
    # Statistics records sign the final B and its round digest (the chain's last link).
    expected = Expected(outcome.group, outcome.session, gs.num_group_rounds, state.globals[-1],
                        shapes, state.parent)  # fmt: skip
    final = ArrayRecord({k: Array(np.array(v)) for k, v in state.b.items()})
    messages = [
        Message(RecordDict({"arrays": final, "config": config}), dst_node_id=n,
                message_type="query.group_stats")
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
            record, stats, count = check_stats_reply(reply.content, by_node[node], expected)
        except AdmissionError as exc:
            log.warning("group %s: statistics of node %s refused: %s", outcome.group, node,
                        printable(exc, 300))  # fmt: skip
            continue
        signed.append(record)
        partials[by_node[node].client] = stats
        examples += count
        loss = reply.content.metric_records.get("metrics", {}).get("heldout-loss")
        if isinstance(loss, float) and np.isfinite(loss):
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
