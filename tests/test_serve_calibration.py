"""Query statistics (seqr/consumer/serve/pool.py): the server starts from the adapters' own
statistics, switches to moments of its own routed prompts once the pool is warm, caps what one
routed adapter's prompts weigh, forgets old prompts, keeps a new adapter out of ``auto`` until
it has its own moments, turns to soft token votes once they have theirs, and SEQR under those
statistics (mean or votes) still equals brute force."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from _route_world import domain_text
from _serve_world import ServeWorld, serve_world

from seqr.consumer.router import RouterConfig
from seqr.consumer.serve.config import PoolConfig
from seqr.consumer.serve.engine import route_prompts
from seqr.consumer.serve.live import build_version
from seqr.consumer.serve.pool import QueryPool, capped_shares
from seqr.consumer.serve.scoring import PromptScores, decide, sequence_scores
from seqr.consumer.serve.source import RegistrySource
from seqr.core.base_model import load_base_model
from seqr.core.errors import ShapeError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
M, SHAS, MODULES = 2, ("a", "b", "c"), ("m0", "m1")


@pytest.fixture(scope="module")
def world() -> ServeWorld:
    return serve_world()


@pytest.fixture(scope="module")
def version(world: ServeWorld) -> Any:
    base = load_base_model(str(world.model_dir))
    return build_version(
        base, RegistrySource(str(world.registry)).audited(), RouterConfig(), ("auto", "base")
    )


def own_like(n: int = 3) -> Any:
    from seqr.consumer.serve.scoring import Calibration

    return Calibration(
        "own",
        torch.zeros(M, n, dtype=torch.float64),
        torch.ones(M, n, dtype=torch.float64),
        torch.ones(n, dtype=torch.bool),
    )


def scores(value: float, n: int = 3) -> torch.Tensor:
    return torch.full((M, n), value, dtype=torch.float64)


def test_capped_shares_water_fill() -> None:
    assert capped_shares(np.array([8.0, 1.0, 1.0]), 0.5) == pytest.approx([0.5, 0.25, 0.25])
    assert capped_shares(np.array([6.0, 3.0, 1.0]), 0.5) == pytest.approx([0.5, 0.375, 0.125])
    assert capped_shares(np.array([9.0, 1.0]), 0.25) == pytest.approx([0.5, 0.5])  # K cap < 1
    assert capped_shares(np.array([1.0, 1.0, 2.0]), 0.9) == pytest.approx([0.25, 0.25, 0.5])


def test_own_statistics_until_the_pool_is_warm() -> None:
    pool = QueryPool(PoolConfig(warm_sequences=4, warm_adapters=2, refresh_every=1))
    own = own_like()
    for i in range(4):
        pool.add(SHAS, MODULES, "a", scores(float(i)))
        assert pool.calibration(SHAS, SHAS, MODULES, own) is own  # one routed adapter only
    pool.add(SHAS, MODULES, "b", scores(10.0))
    calibration = pool.calibration(SHAS, SHAS, MODULES, own)
    assert calibration.kind == "queries" and calibration.pool_sequences == 5
    assert calibration.describe() == {
        "kind": "queries",
        "pool_sequences": 5,
        "aggregation": "mean",
    }  # no prompt voted yet: votes are taken under query statistics only
    assert bool(calibration.routable.all()) and not calibration.pending


def test_one_routed_adapters_prompts_cannot_dominate_the_moments() -> None:
    """A flood of prompts routed to "a" (score 0) against a few routed to "b" (score 1): with
    the weight of each routed group capped at 1/2 the mean is 0.5, not ~0.01."""
    config = PoolConfig(
        capacity=400, max_share=0.5, warm_sequences=4, half_life=10**6, refresh_every=1
    )
    pool = QueryPool(config)
    for _ in range(300):
        pool.add(SHAS, MODULES, "a", scores(0.0))
    for _ in range(4):
        pool.add(SHAS, MODULES, "b", scores(1.0))
    calibration = pool.calibration(SHAS, SHAS, MODULES, own_like())
    assert calibration.kind == "queries"
    assert calibration.mean.numpy() == pytest.approx(np.full((M, 3), 0.5), abs=1e-3)
    assert calibration.std.numpy() == pytest.approx(np.full((M, 3), 0.5), abs=1e-3)
    assert len(pool) == 204  # group "a" holds at most max_share * capacity = 200 prompts


def test_old_prompts_weigh_less_than_new_ones() -> None:
    config = PoolConfig(
        capacity=64, max_share=1.0, warm_sequences=2, warm_adapters=1, half_life=4, refresh_every=1
    )
    pool = QueryPool(config)
    pool.add(SHAS, MODULES, "a", scores(0.0))
    for _ in range(8):  # two half-lives later the first prompt weighs 1/4 of a new one
        pool.add(SHAS, MODULES, "a", scores(1.0))
    weights = np.array([0.5 ** (8 / 4)] + [0.5 ** (k / 4) for k in range(7, -1, -1)])
    expected = weights[1:].sum() / weights.sum()
    assert pool.calibration(SHAS, SHAS, MODULES, own_like()).mean[0, 0] == pytest.approx(expected)


def test_a_new_adapter_is_pending_until_the_pool_has_scored_it() -> None:
    pool = QueryPool(PoolConfig(warm_sequences=3, refresh_every=1))
    old = SHAS[:2]
    for i in range(6):
        pool.add(old, MODULES, old[i % 2], scores(float(i), n=2))
    calibration = pool.calibration(SHAS, ("A", "B", "C"), MODULES, own_like())
    assert calibration.kind == "queries" and calibration.pending == ("C",)
    assert calibration.routable.tolist() == [True, True, False]
    raw = torch.stack([scores(0.0), scores(0.0)]) + torch.tensor([0, 0, 99.0])
    decision = decide(PromptScores(raw), calibration)
    assert 2 not in decision.indices  # the pending adapter is never chosen
    for i in range(3):  # scored on every routed prompt, it becomes routable
        pool.add(SHAS, MODULES, SHAS[i % 2], scores(float(i)))
    assert not pool.calibration(SHAS, ("A", "B", "C"), MODULES, own_like()).pending


def votes(*shares: float) -> torch.Tensor:
    return torch.tensor(shares, dtype=torch.float64)


def test_soft_votes_decide_once_the_pool_holds_their_statistics() -> None:
    pool = QueryPool(PoolConfig(warm_sequences=4, refresh_every=1, max_share=1.0))
    own, everyone = own_like(), torch.ones(3, dtype=torch.bool)
    for i in range(4):  # routed under own statistics: no votes taken
        pool.add(SHAS, MODULES, SHAS[i % 2], scores(float(i)))
    calibration = pool.calibration(SHAS, SHAS, MODULES, own)
    assert pool.votes_under(own) is None and pool.votes_under(calibration) is calibration
    shares = [votes(0.6, 0.3, 0.1), votes(0.2, 0.7, 0.1), votes(0.5, 0.4, 0.1)]
    for i in range(3):
        pool.add(SHAS, MODULES, SHAS[i % 2], scores(float(i)), shares[i], everyone)
        assert pool.calibration(SHAS, SHAS, MODULES, own).votes is None  # 3 < warm_sequences
    pool.add(SHAS, MODULES, "b", scores(1.0), votes(0.3, 0.6, 0.1), everyone)
    calibration = pool.calibration(SHAS, SHAS, MODULES, own)
    assert calibration.describe()["aggregation"] == "soft_vote"
    assert calibration.votes is not None
    mean, std = calibration.votes
    # No cap (max_share 1): each voting prompt weighs by its age (0.5 per half_life prompts).
    values = torch.stack([*shares, votes(0.3, 0.6, 0.1)])
    decay = torch.tensor([0.5 ** ((3 - k) / 512) for k in range(4)], dtype=torch.float64)
    weights = decay / decay.sum()
    assert mean.numpy() == pytest.approx((weights @ values).numpy())
    assert std[:2].numpy() == pytest.approx(
        (weights @ (values - weights @ values) ** 2).sqrt()[:2].numpy()
    )
    assert float(std[2]) == 1e-12  # the same share in every prompt: floored, never 0
    # The decision is the standardised share, not the mean z-score (which favours "c" here).
    raw = scores(0.0) + torch.tensor([0, 0, 50.0])
    decision = decide(PromptScores(raw[None], votes(0.9, 0.05, 0.05)[None]), calibration)
    assert decision.indices == [0]
    with pytest.raises(ShapeError, match="need the prompts' votes"):
        decide(PromptScores(raw[None]), calibration)


def test_votes_over_another_set_of_adapters_do_not_count() -> None:
    """Soft votes are shares of a softmax over the routable adapters: when that set changes
    (a new adapter leaves pending), older votes are not comparable and the mean decides."""
    pool = QueryPool(PoolConfig(warm_sequences=2, refresh_every=1))
    two = torch.tensor([True, True, False])
    for i in range(4):
        pool.add(SHAS, MODULES, SHAS[i % 2], scores(float(i)), votes(0.5, 0.5, 0.0), two)
    calibration = pool.calibration(SHAS, SHAS, MODULES, own_like())
    assert calibration.routable.all() and calibration.votes is None
    pool.add(SHAS, MODULES, "a", scores(1.0), votes(0.4, 0.4, 0.2), torch.ones(3, dtype=bool))
    pool.add(SHAS, MODULES, "b", scores(2.0), votes(0.3, 0.4, 0.3), torch.ones(3, dtype=bool))
    assert pool.calibration(SHAS, SHAS, MODULES, own_like()).votes is not None


def test_non_finite_votes_never_enter_the_pool() -> None:
    pool = QueryPool(PoolConfig(warm_sequences=2, refresh_every=1))
    everyone = torch.ones(3, dtype=torch.bool)
    for i in range(4):
        pool.add(SHAS, MODULES, SHAS[i % 2], scores(float(i)), votes(float("nan"), 0.5, 0.5),
                 everyone)  # fmt: skip
    calibration = pool.calibration(SHAS, SHAS, MODULES, own_like())
    assert calibration.kind == "queries" and calibration.votes is None  # the scores stayed
    with pytest.raises(ShapeError, match="pool votes"):
        pool.add(SHAS, MODULES, "a", scores(0.0), votes(0.5, 0.5), everyone)
    assert len(pool) == 4


def test_repr_shows_no_scores() -> None:
    pool = QueryPool(PoolConfig())
    pool.add(SHAS, MODULES, "a", scores(123.456))
    assert repr(pool) == "QueryPool(1 prompts)" and "123" not in repr(pool)


@torch.no_grad()
def brute_token_z(version: Any, ids: list[int], mean: torch.Tensor, std: torch.Tensor) -> Any:
    """(z, keep): (M, T, N) z-scores (||B_i A x|| [/ ||A x||] - mu) / sigma of every token and
    (M, T) the tokens the token rule counts (not the first; for gains not where ||A x|| <=
    1e-4 ||x||), with B_i and A read from each peft LoRA layer and multiplied out: no QR, no
    seqr routing code."""
    model = version.peft_model
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.layer.register_forward_hook(lambda mod, a, o, n=m.name: inputs.__setitem__(n, a[0][0]))
        for m in version.first_pass[1]
    ]
    with model.disable_adapter():
        model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    modules, n = version.first_pass[1], len(version.names)
    z = torch.zeros(len(modules), len(ids), n, dtype=torch.float64)
    keep = torch.ones(len(modules), len(ids), dtype=torch.bool)
    keep[:, 0] = False  # not the first token (massive activation)
    for m_index, module in enumerate(modules):
        x = inputs[module.name].double()
        for i in range(n):
            a = module.layer.lora_A[f"a{i}"].weight.double()
            b = module.layer.lora_B[f"a{i}"].weight.double()
            value = (x @ a.T @ b.T).norm(dim=-1)
            if module.score == "gain":
                energy = (x @ a.T).norm(dim=-1)
                value = value / energy
                keep[m_index] &= energy > 1e-4 * x.norm(dim=-1)
            z[m_index, :, i] = (value - mean[m_index, i]) / std[m_index, i]
    return z, keep


def brute_force(version: Any, ids: list[int], mean: torch.Tensor, std: torch.Tensor) -> Any:
    """Mean over modules of each module's token mean z-score (the default aggregation)."""
    z, keep = brute_token_z(version, ids, mean, std)
    return torch.stack([z[m][keep[m]].mean(dim=0) for m in range(len(z))]).mean(dim=0)


def brute_votes(version: Any, ids: list[int], calibration: Any, temperature: float) -> Any:
    """Soft token votes: each counted token's mean z-score over the modules counting it,
    softmax over the routable adapters at ``temperature``, mean over the counted tokens."""
    z, keep = brute_token_z(version, ids, calibration.mean, calibration.std)
    count = keep.sum(dim=0)  # (T,)
    decisions = (z * keep[..., None]).sum(dim=0) / count.clamp_min(1)[:, None]
    decisions[:, ~calibration.routable] = -torch.inf
    return torch.softmax(decisions / temperature, dim=-1)[count > 0].mean(dim=0)


def test_seqr_equals_brute_force_under_query_statistics(version: Any) -> None:
    base_tokenizer = version.router.tokenizer
    pool = QueryPool(PoolConfig(warm_sequences=6, refresh_every=1))
    texts = [domain_text(d, 1, seed) for seed in (3, 4, 5) for d in ("code", "digits", "upper")]
    own = version.own
    for text in texts:  # route each prompt, then pool its scores (the engine's step)
        ids = torch.tensor([base_tokenizer(text)["input_ids"]])
        route_prompts(version, pool, ids, torch.ones_like(ids))
    calibration = pool.calibration(version.shas, version.names, version.modules, own)
    assert calibration.kind == "queries"
    assert not torch.allclose(calibration.mean, own.mean)  # other statistics than the own ones
    assert calibration.votes is None  # 3 prompts voted, fewer than warm_sequences
    probe = [domain_text(d, 2, 9) for d in ("code", "digits", "upper")]
    shares = []
    for text in probe:
        ids = base_tokenizer(text)["input_ids"]
        mask = torch.ones(1, len(ids), dtype=torch.long)
        scored = sequence_scores(version.first_pass, torch.tensor([ids]), mask, calibration)
        decision = decide(scored, calibration)
        expected = brute_force(version, ids, calibration.mean, calibration.std)
        assert decision.scores[0] == pytest.approx(expected, abs=1e-4)
        assert decision.indices[0] == int(torch.argmax(expected))
        assert scored.votes is not None
        votes = brute_votes(version, ids, calibration, PoolConfig().vote_temperature)
        assert scored.votes[0] == pytest.approx(votes, abs=1e-5)
        shares.append((scored, votes))
    # A pending adapter takes no share of any token's vote.
    pending = dataclasses.replace(calibration, routable=torch.tensor([True, True, False]))
    ids = base_tokenizer(probe[0])["input_ids"]
    scored = sequence_scores(version.first_pass, torch.tensor([ids]),
                             torch.ones(1, len(ids), dtype=torch.long), pending)  # fmt: skip
    assert scored.votes is not None and float(scored.votes[0, 2]) == 0.0
    votes = brute_votes(version, ids, pending, PoolConfig().vote_temperature)
    assert scored.votes[0] == pytest.approx(votes, abs=1e-5)
    # With vote statistics the decision is the standardised share, brute force's too.
    stats = torch.stack([v for _, v in shares]).mean(0), torch.tensor([0.1, 0.2, 0.3]).double()
    voting = dataclasses.replace(calibration, votes=stats)
    for scored, votes in shares:
        expected = (votes - stats[0]) / stats[1]
        assert decide(scored, voting).scores[0] == pytest.approx(expected, abs=1e-4)
        assert decide(scored, voting).indices[0] == int(torch.argmax(expected))
