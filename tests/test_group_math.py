"""The maths of task groups: Flower's FedAvg of B over the shared frozen A is exact, the DP
wrapper clips and noises as configured, and the privacy accountant's epsilon is sound."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
)
from flwr.supercore.task_identity import TaskIdentity

from seqr.core.errors import ConfigError
from seqr.node.calibrate import analytic_gaussian_sigma
from seqr.operator.group_privacy import GaussianRdpAccountant, gaussian_epsilon, make_accountant
from seqr.operator.groups import (
    GroupSettings,
    MemberSlot,
    NodeSubset,
    make_strategy,
    parse_task_groups,
)

RNG = np.random.default_rng(0)
FP = [f"sha256:{i:064x}" for i in range(8)]  # key fingerprints of the members' slots


def _groups(n: int) -> str:
    return "g:" + ",".join(FP[:n])


def _reply(node: int, b: np.ndarray, examples: int) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600.0,
        message_type=MessageType.TRAIN,
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord({"b": Array(b)}),
            # What the server writes after its checks: its own weight (here: the count).
            "metrics": MetricRecord({"server-weight": float(examples)}),
        }
    )
    return Message(content, metadata=metadata)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_fedavg_of_b_over_shared_a_equals_weighted_mean_of_products(dtype, tol) -> None:
    # Prepare: one frozen A, three clients' B and example counts.
    a = RNG.standard_normal((4, 32)).astype(dtype)  # (r, d_in)
    bs = [RNG.standard_normal((16, 4)).astype(dtype) for _ in range(3)]  # (d_out, r)
    counts = [3, 5, 8]
    # Execute: the strategy the group flow builds (Flower's FedAvg, weighted by num-examples).
    strategy = make_strategy(GroupSettings(task_groups=_groups(3)), 3)
    replies = [_reply(i, b, n) for i, (b, n) in enumerate(zip(bs, counts, strict=True))]
    aggregated, _ = strategy.aggregate_train(1, replies)
    # Assert: (weighted mean of B) A == weighted mean of the products B_i A.
    products = sum(n * (b.astype(np.float64) @ a) for b, n in zip(bs, counts, strict=True))
    expected = products / sum(counts)
    got = aggregated["b"].numpy().astype(np.float64) @ a.astype(np.float64)
    assert isinstance(strategy, FedAvg) and type(strategy) is FedAvg
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    # A plain (unweighted) mean would differ: the weights matter.
    assert not np.allclose(got, sum(b @ a for b in bs) / 3, rtol=1e-3)


@pytest.mark.parametrize(
    "settings, kind",
    [
        ({"group_aggregation": "fedtrimmedavg", "group_trim_beta": 0.25}, FedTrimmedAvg),
        ({"group_aggregation": "fedmedian"}, FedMedian),
        ({"group_aggregation": "krum", "group_krum_malicious": 1}, Krum),
        ({"group_dp": "server"}, DifferentialPrivacyServerSideFixedClipping),
    ],
)
def test_poisoning_and_dp_options_are_flowers_strategies(settings, kind) -> None:
    strategy = make_strategy(GroupSettings(task_groups=_groups(4), **settings), 4)
    assert isinstance(strategy, kind)


@pytest.mark.parametrize(
    "settings",
    [
        {"group_aggregation": "fedmedian"},
        {"group_aggregation": "fedtrimmedavg", "group_trim_beta": 0.2},
        {"group_aggregation": "krum", "group_krum_malicious": 1},
    ],
)
def test_robust_rules_resist_one_poisoned_client(settings) -> None:
    honest = [np.full((8, 4), v, np.float32) for v in (1.0, 1.1, 0.9, 1.05)]
    poisoned = np.full((8, 4), 1e4, np.float32)
    replies = [_reply(i, b, 10) for i, b in enumerate([*honest, poisoned])]
    strategy = make_strategy(GroupSettings(task_groups=_groups(2), **settings), 5)
    aggregated, _ = strategy.aggregate_train(1, replies)
    b = aggregated["b"].numpy()
    assert b.min() >= 0.9 and b.max() <= 1.1  # the plain mean would be about 2000


def test_server_side_dp_clips_each_update_adds_noise_and_accounts_epsilon(monkeypatch) -> None:
    # Prepare: messages built by the strategy need a task identity outside a runtime.
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    clip, z, n = 0.5, 1.0, 4
    gs = GroupSettings(task_groups=_groups(2), group_dp="server", group_dp_clip=clip,
                       group_dp_noise_multiplier=z, group_dp_delta=1e-5)  # fmt: skip
    strategy = make_strategy(gs, n)
    start = np.zeros((64, 64), np.float32)
    messages = list(strategy.configure_train(1, ArrayRecord({"b": Array(start)}), ConfigRecord(),
                                             NodeSubset(None, [1, 2, 3, 4])))  # fmt: skip
    direction = np.ones((64, 64), np.float32) / 64.0  # unit L2 norm
    replies = [_reply(i + 1, 100.0 * direction, 10) for i in range(n)]  # updates of norm 100
    # Execute
    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    aggregated, _ = strategy.aggregate_train(1, replies)
    # Assert: the mean of the clipped updates is clip * direction; noise std is z * clip / n.
    assert len(messages) == n
    residual = aggregated["b"].numpy() - clip * direction
    assert abs(residual.mean()) < 0.01
    assert residual.std() == pytest.approx(z * clip / n, rel=0.05)
    spent = strategy.privacy_spent()
    assert spent.num_releases == 1
    assert spent.epsilon == pytest.approx(gaussian_epsilon(z, 1, 1e-5)[0], rel=0.05)


def test_rdp_epsilon_is_sound_and_close_to_the_exact_gaussian_bound() -> None:
    # The exact (analytic) Gaussian mechanism (Balle & Wang 2018, seqr/node/calibrate.py) needs
    # noise sigma(eps) for (eps, delta)-DP. The RDP epsilon of noise 1 must be sound: the
    # exact mechanism needs at most noise 1 for it; and not loose: at least 0.8.
    for z in (0.8, 1.0, 2.0, 4.0):
        eps, _ = gaussian_epsilon(z, 1, 1e-5)
        sigma = analytic_gaussian_sigma(eps, 1e-5, 1.0)
        assert 0.8 * z <= sigma <= z
    # Composition: R rounds of z cost what one round of z / sqrt(R) costs (RDP is additive).
    assert gaussian_epsilon(2.0, 4, 1e-5)[0] == pytest.approx(gaussian_epsilon(1.0, 1, 1e-5)[0])


def test_closed_form_accountant_follows_flowers_protocol() -> None:
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod

    config = PrivacyConfig(1e-5, 4, NeighboringRelation.ADD_OR_REMOVE_ONE,
                           SamplingMethod.NO_AMPLIFICATION, max_epsilon=50.0)  # fmt: skip
    accountant = GaussianRdpAccountant(config)
    event = type("Event", (), {"noise_multiplier": 1.0})()
    assert accountant.get_privacy_spent().epsilon == 0.0
    accountant.compose(event, count=3)
    assert accountant.num_releases == 3
    assert accountant.get_epsilon(1e-5) == pytest.approx(gaussian_epsilon(1.0, 3, 1e-5)[0])
    assert accountant.get_delta(accountant.get_epsilon(1e-5)) == pytest.approx(1e-5, rel=0.01)
    assert accountant.would_exceed(event, count=1000) and not accountant.would_exceed(event)
    restored = GaussianRdpAccountant(config)
    restored.load_state_dict(accountant.state_dict())
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    # make_accountant gives Flower's RdpAccountant when dp-accounting is installed.
    assert make_accountant(delta=1e-5, population=4, max_epsilon=None).config.population_size == 4


@pytest.mark.parametrize(
    "spec, error",
    [
        ("wiki", "NAME:member"),
        (f"wiki:{FP[0]}", "needs >= 2"),
        (f"wiki:{FP[0]},{FP[1]};code:{FP[1]},{FP[2]}", "in task groups 'wiki' and 'code'"),
        (f"wiki:a@{FP[0]},a@{FP[1]}", "in task groups 'wiki' and 'wiki'"),
        (f"wiki:{FP[0]},{FP[1]};wiki:{FP[2]},{FP[3]}", "twice"),
        (f"wi ki:{FP[0]},{FP[1]}", "NAME:member"),
        # A name alone is no slot: anyone could claim it.
        ("wiki:wiki_part0,wiki_part1", "names no signing key; bind it to its client key"),
        (f"wiki:bad name@{FP[0]},{FP[1]}", "bad adapter name"),
        ("wiki:sha256:xyz,sha256:abc", "names no signing key"),
    ],
)
def test_bad_task_groups_are_refused_with_the_reason(spec, error) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_task_groups(spec)


def test_task_groups_bind_slots_to_keys_and_dp_needs_plain_fedavg() -> None:
    assert parse_task_groups(f" wiki:w0@{FP[0]}, {FP[1]} ;code:c0@{FP[2]},c1@{FP[3]};") == {
        "wiki": (MemberSlot(FP[0], "w0"), MemberSlot(FP[1])),
        "code": (MemberSlot(FP[2], "c0"), MemberSlot(FP[3], "c1")),
    }
    with pytest.raises(ConfigError, match="must be fedavg with group-dp"):
        GroupSettings(task_groups=_groups(2), group_dp="client", group_aggregation="krum")
    with pytest.raises(ConfigError, match="group-local-steps"):
        GroupSettings.from_run_config({"group-local-steps": 0})
    with pytest.raises(ConfigError, match="group-max-weight-share"):
        GroupSettings(group_max_weight_share=0.0)
