"""Who holds which task-group slot: a slot is bound to a signing key, proven on a challenge.

The server sends every connected node ``query.group`` with a fresh random challenge; a node
answers with its adapter name, its public key and a membership proof: the challenge, name and
key signed with that key (seqr.registry.contribution_records.sign_membership). A node gets a
slot (GroupSettings: a key fingerprint, optionally bound to an adapter name) only when

1. its proof verifies, answers THIS challenge, was made by THIS node (a proof copied to
   another node fails) and names the key it declared;
2. that key's fingerprint is a slot's, and the adapter name matches the slot's when it names
   one (a name alone is never enough: anyone can claim a name);
3. the key is enrolled in the registry (unless auto-enrol) and not revoked;
4. no other node proved the same key (only the key's holder can cause that: both are left out).

Everything else is refused with a reason, logged, and never changes another member's slot:
claiming an offline member's name or key gets nothing, and an online member cannot be knocked
out by someone who does not hold its key.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict

from seqr.core.errors import RegistryError, SeqrError
from seqr.core.printable import printable
from seqr.operator.group_replies import Member
from seqr.operator.groups import MemberSlot
from seqr.registry.contributions import SignedContribution, verify_membership

__all__ = [
    "MEMBER_RECORD",
    "CHALLENGE_KEY",
    "Membership",
    "assign_members",
    "discover_members",
    "new_challenge",
]

log = logging.getLogger("seqr.server.groups")
MEMBER_RECORD = "group-member"  # the node's reply (seqr/node/group_app.py)
QUERY_RECORD = "group-query"  # the server's query: ConfigRecord holding the challenge
CHALLENGE_KEY = "challenge"


def new_challenge() -> str:
    """128 random bits, hex: a proof for one query cannot be replayed in another."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class Membership:
    """The outcome of one membership query."""

    members: Mapping[str, list[Member]]  # group -> members, by node id
    refused: Mapping[int, str]  # node id -> why it got no slot (nodes in no group are absent)


def assign_members(
    replies: Iterable[tuple[int, RecordDict]],
    groups: Mapping[str, Sequence[MemberSlot]],
    challenge: str,
    *,
    enrolled: set[str] | None,
    revoked: set[str],
) -> Membership:
    """Slots for the nodes whose replies prove a slot's key (the module's four rules).

    ``replies``: (node id, reply content); ``enrolled``: fingerprints of enrolled keys (None:
    auto-enrol, any key a slot names); ``revoked``: fingerprints never accepted. Pure.
    """
    slots = {slot.fingerprint: (group, slot) for group, listed in groups.items() for slot in listed}
    proven: dict[str, list[tuple[int, str, bytes]]] = {}
    refused: dict[int, str] = {}
    for node, content in replies:
        try:
            name, key = _proof(content, challenge, node)
        except SeqrError as exc:
            refused[node] = f"bad_membership: {exc}"
            continue
        proven.setdefault(_fingerprint(key), []).append((node, name, key))
    members: dict[str, list[Member]] = {group: [] for group in groups}
    for keyid, claims in sorted(proven.items()):
        nodes = [node for node, _, _ in claims]
        if keyid not in slots:
            for node in nodes:
                refused[node] = f"no_slot: key {keyid} holds no task-group slot"
            continue
        group, slot = slots[keyid]
        why = _slot_refusal(keyid, slot, claims, enrolled, revoked)
        if why:
            for node in nodes:
                refused[node] = why
            continue
        node, name, key = claims[0]
        members[group].append(Member(node, name, key))
    for node, reason in sorted(refused.items()):
        log.warning("node %d left out of the task groups: %s", node, printable(reason, 300))
    return Membership(
        {g: sorted(m, key=lambda x: x.node_id) for g, m in members.items()}, dict(refused)
    )


def _slot_refusal(
    keyid: str,
    slot: MemberSlot,
    claims: list[tuple[int, str, bytes]],
    enrolled: set[str] | None,
    revoked: set[str],
) -> str:
    if keyid in revoked:
        return f"revoked_key: key {keyid} was revoked"
    if enrolled is not None and keyid not in enrolled:
        return f"unknown_key: key {keyid} is not enrolled; `seqr server enrol` it first"
    if len(claims) > 1:
        nodes = [node for node, _, _ in claims]
        return f"duplicate_key: nodes {nodes} all proved key {keyid}; only one may hold a slot"
    name = claims[0][1]
    if slot.name is not None and name != slot.name:
        return (
            f"wrong_name: key {keyid}'s slot is bound to adapter name {slot.name!r}, the node "
            f"uses {printable(name, 80)!r}"
        )
    return ""


def _proof(content: RecordDict, challenge: str, node: int) -> tuple[str, bytes]:
    """(adapter name, public key) of a reply whose membership proof verifies."""
    record = content.config_records.get(MEMBER_RECORD, ConfigRecord())
    payload, signature = record.get("proof"), record.get("signature")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise RegistryError("the reply carries no signed membership proof")
    proof = verify_membership(
        SignedContribution(payload, signature), challenge, node, f"node {node} membership proof"
    )
    declared_name, declared_key = record.get("adapter-name"), record.get("public-key")
    if declared_name != proof.adapter_name or declared_key != proof.client_key:
        raise RegistryError("the declared name or key differs from the signed proof")
    return proof.adapter_name, proof.client_key


def _fingerprint(key: bytes) -> str:
    from seqr.core.signing import fingerprint

    return fingerprint(key)


def discover_members(
    grid: object,
    nodes: Sequence[int],
    groups: Mapping[str, Sequence[MemberSlot]],
    *,
    enrolled: set[str] | None,
    revoked: set[str],
    timeout_s: float,
) -> Membership:
    """Send ``query.group`` with a fresh challenge to every node and assign the slots."""
    challenge = new_challenge()
    query = RecordDict({QUERY_RECORD: ConfigRecord({CHALLENGE_KEY: challenge})})
    messages = [Message(query, dst_node_id=n, message_type="query.group") for n in nodes]
    replies = grid.send_and_receive(messages, timeout=timeout_s)  # type: ignore[attr-defined]
    answered = [
        (reply.metadata.src_node_id, reply.content) for reply in replies if not reply.has_error()
    ]
    return assign_members(answered, groups, challenge, enrolled=enrolled, revoked=revoked)
