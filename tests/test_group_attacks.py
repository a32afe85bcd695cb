"""Attacks on task groups, each refused with its reason and the group state unchanged: slots
are bound to enrolled keys (proven on a challenge), FedAvg weights are the server's and
capped, example counts and update norms are bounded, and every reply must continue the round
chain. Real keys, real signatures, real Flower messages and Flower's own FedAvg."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from seqr.core import signing
from seqr.core.value_bounds import WeightBounds
from seqr.operator.group_membership import MEMBER_RECORD, assign_members, new_challenge
from seqr.operator.group_replies import Member, UpdateBounds
from seqr.operator.group_round import GroupState, advance, check_round, weigh
from seqr.operator.groups import GroupSettings, MemberSlot, make_strategy
from seqr.registry.contributions import (
    Contribution,
    arrays_sha256,
    round_digest,
    sign_contribution,
    sign_membership,
)

SHAPES = {"b.q": (16, 4), "b.v": (8, 4)}
SESSION = "5e" * 16
NAMES = ("a", "b", "c")
LR, STEPS = 2e-3, 10


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {name: signing.generate_private_key() for name in (*NAMES, "attacker")}


def _fp(key: Any) -> str:
    return signing.fingerprint(signing.public_key_bytes(key))


def _groups(keys: dict[str, Any]) -> dict[str, tuple[MemberSlot, ...]]:
    return {"g": tuple(MemberSlot(_fp(keys[n]), n) for n in NAMES)}


def _metadata(node: int, kind: str = "train") -> Metadata:
    return Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
        message_type=kind,
    )  # fmt: skip


# --- membership: slots bound to keys -------------------------------------------------------


def _membership(node: int, name: str, key: Any, challenge: str, declared: Any = None) -> tuple:
    proof = sign_membership(challenge, node, name, key)
    public = signing.public_key_bytes(declared if declared is not None else key)
    record = ConfigRecord({"adapter-name": name, "public-key": public,
                           "proof": proof.payload, "signature": proof.signature})  # fmt: skip
    return node, RecordDict({MEMBER_RECORD: record})


def _assign(keys: dict[str, Any], replies: list[tuple], challenge: str, **kw: Any) -> Any:
    enrolled = {_fp(keys[n]) for n in NAMES} | {_fp(keys["attacker"])}
    return assign_members(replies, _groups(keys), challenge, enrolled=kw.get("enrolled", enrolled),
                          revoked=kw.get("revoked", set()))  # fmt: skip


def test_client_taking_an_offline_members_slot_refused(keys: dict[str, Any]) -> None:
    challenge = new_challenge()
    honest = [_membership(1, "a", keys["a"], challenge), _membership(2, "b", keys["b"], challenge)]
    # Member c is offline; an enrolled attacker answers with c's adapter name (its own key),
    # then declaring c's public key beside a proof signed by its own key.
    as_name = _membership(9, "c", keys["attacker"], challenge)
    as_key = _membership(10, "c", keys["attacker"], challenge, declared=keys["c"])
    result = _assign(keys, [*honest, as_name, as_key], challenge)
    assert [(m.node_id, m.adapter_name) for m in result.members["g"]] == [(1, "a"), (2, "b")]
    assert (
        result.refused[9].startswith("no_slot: key") and _fp(keys["attacker"]) in result.refused[9]
    )
    assert "differs from the signed proof" in result.refused[10]
    assert set(result.refused) == {9, 10}


def test_knocking_out_an_online_member_by_claiming_its_name_fails(keys: dict[str, Any]) -> None:
    challenge = new_challenge()
    honest = [_membership(n, name, keys[name], challenge) for n, name in enumerate(NAMES, 1)]
    # The attacker claims a's name with its own key; replays a's proof from an earlier query;
    # and copies a's proof for THIS query (as seen on the wire) into its own reply.
    claim = _membership(9, "a", keys["attacker"], challenge)
    old = _membership(10, "a", keys["a"], new_challenge())
    copied = (11, honest[0][1])
    result = _assign(keys, [*honest, claim, old, copied], challenge)
    before = [(m.node_id, m.adapter_name, m.public_key) for m in result.members["g"]]
    assert before == [(n, name, signing.public_key_bytes(keys[name]))
                      for n, name in enumerate(NAMES, 1)]  # fmt: skip
    assert result.refused[9].startswith("no_slot")
    assert "replayed" in result.refused[10]
    assert "made by node 1, not node 11 (copied)" in result.refused[11]


def test_slot_needs_an_enrolled_unrevoked_key_and_its_bound_name(keys: dict[str, Any]) -> None:
    challenge = new_challenge()
    replies = [_membership(1, "a", keys["a"], challenge), _membership(2, "x", keys["b"], challenge),
               _membership(3, "c", keys["c"], challenge)]  # fmt: skip
    result = _assign(keys, replies, challenge, enrolled={_fp(keys["a"]), _fp(keys["b"])},
                     revoked={_fp(keys["a"])})  # fmt: skip
    assert result.members["g"] == []
    assert result.refused[1].startswith("revoked_key")
    assert result.refused[2].startswith("wrong_name") and "'b'" in result.refused[2]
    assert result.refused[3].startswith("unknown_key")


# --- rounds: weights, example counts, update norms, the chain --------------------------------


def _b(seed: int, scale: float = 1e-3, base: dict | None = None) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    start = base or {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    return {k: (start[k] + gen.standard_normal(s) * scale).astype(np.float32)
            for k, s in SHAPES.items()}  # fmt: skip


def _update(node: int, key: Any, state: GroupState, b: dict, examples: int, **over: Any):
    fields = dict(group="g", session=SESSION, kind="update", round=state.round + 1,
                  client_key=signing.public_key_bytes(key), example_count=examples,
                  sha256=arrays_sha256(b), base_sha256=state.globals[-1],
                  parent_sha256=state.parent)  # fmt: skip
    fields.update(over)
    signed = sign_contribution(Contribution(**fields), key)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in b.items()}),
        "metrics": MetricRecord({"num-examples": examples, "train-loss": 2.5}),
        "contribution": ConfigRecord({"record": signed.payload, "signature": signed.signature}),
    })  # fmt: skip
    return Message(content, metadata=_metadata(node))


def _members(keys: dict[str, Any]) -> dict[int, Member]:
    return {n: Member(n, name, signing.public_key_bytes(keys[name]))
            for n, name in enumerate(NAMES, 1)}  # fmt: skip


def _round(keys: dict[str, Any], state: GroupState, replies: list[Message], gs: GroupSettings):
    """One round as the server runs it: check, weigh, Flower's FedAvg, advance."""
    entries = sum(r * c for r, c in SHAPES.values())
    bounds = UpdateBounds(state.b, gs.max_update_norm(LR, entries), gs.group_max_examples,
                          WeightBounds())  # fmt: skip
    checked = check_round(replies, _members(keys), state.expected("g", SESSION, SHAPES), bounds)
    shares = weigh(checked.good, gs)
    aggregated, _ = make_strategy(gs, 3).aggregate_train(1, [u.reply for u in checked.good])
    arrays = {k: v.numpy() for k, v in aggregated.items()}
    return advance(state, arrays, checked.good, WeightBounds()), checked, shares


SETTINGS = GroupSettings(
    task_groups="g:" + ",".join(f"sha256:{i:064x}" for i in range(3)),
    group_local_steps=STEPS, group_max_examples=1000, group_max_weight_share=0.5,
)  # fmt: skip


def _honest_round(keys: dict[str, Any], state: GroupState) -> list[Message]:
    return [_update(1, keys["a"], state, _b(1), 100), _update(2, keys["b"], state, _b(2), 120)]


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        (lambda k, s: _update(3, k["c"], s, _b(3), 2**53 - 1), "too_many_examples"),
        (lambda k, s: _update(3, k["c"], s, _b(3, scale=1.0), 100), "update_too_large"),
        (lambda k, s: _update(3, k["c"], s, _b(3, scale=1e20), 100), "weights_out_of_bounds"),
        (
            lambda k, s: _update(3, k["c"], s, _b(3), 100, parent_sha256="ab" * 32),
            "wrong_contribution",
        ),
        (lambda k, s: _update(3, k["attacker"], s, _b(3), 100), "key_mismatch"),
    ],
    ids=["huge_num_examples", "huge_update", "huge_b", "forged_round_chain", "other_key"],
)
def test_attacking_update_refused_and_the_group_state_unchanged(
    keys: dict[str, Any], attack: Any, reason: str
) -> None:
    # Prepare: the state after round 0, and what the two honest members alone produce.
    state = GroupState.initial(SHAPES)
    snapshot = (state.globals, state.aggregated, {k: v.copy() for k, v in state.b.items()})
    expected, _, _ = _round(keys, state, _honest_round(keys, state), SETTINGS)
    # Execute: the same round with member c attacking.
    after, checked, shares = _round(keys, state, [*_honest_round(keys, state), attack(keys, state)],
                                    SETTINGS)  # fmt: skip
    # Assert: refused with its reason; the next state is exactly the honest one; the state
    # it started from is untouched.
    assert checked.rejected["3"].startswith(reason), checked.rejected
    assert [u.node_id for u in checked.good] == [1, 2] and len(shares) == 2
    assert after.globals == expected.globals and after.aggregated == expected.aggregated
    for name in SHAPES:
        np.testing.assert_array_equal(after.b[name], expected.b[name])
        np.testing.assert_array_equal(state.b[name], snapshot[2][name])
    assert (state.globals, state.aggregated) == snapshot[:2]


def test_one_member_cannot_decide_the_average_within_the_example_bound(
    keys: dict[str, Any],
) -> None:
    state = GroupState.initial(SHAPES)
    big = _update(3, keys["c"], state, _b(3), SETTINGS.group_max_examples)  # at the bound
    after, checked, shares = _round(keys, state, [*_honest_round(keys, state), big], SETTINGS)
    assert not checked.rejected and shares[2] == pytest.approx(0.5)
    assert shares[0] / shares[1] == pytest.approx(100 / 120)  # honest ones stay proportional
    own = _b(3)
    cosine = sum(float((after.b[k] * own[k]).sum()) for k in SHAPES) / (
        np.sqrt(sum(float((after.b[k] ** 2).sum()) for k in SHAPES))
        * np.sqrt(sum(float((own[k] ** 2).sum()) for k in SHAPES))
    )
    assert cosine < 0.9  # uncapped FedAvg would give it 1000/1220 of the weight


def test_rounds_form_a_chain_each_member_signs(keys: dict[str, Any]) -> None:
    state = GroupState.initial(SHAPES)
    one, _, _ = _round(keys, state, _honest_round(keys, state), SETTINGS)
    assert one.parent == round_digest(one.globals[1], one.aggregated[0])
    # A round-2 reply that names round 0's digest (replayed into the wrong place) is refused.
    stale = _update(3, keys["c"], one, _b(3, base=dict(one.b)), 100, parent_sha256=state.parent)
    two, checked, _ = _round(keys, one, [*_honest_round(keys, one), stale], SETTINGS)
    assert "forged round chain" in checked.rejected["3"]
    assert two.round == 2 and len(two.aggregated) == 2 and two.globals[:2] == one.globals
