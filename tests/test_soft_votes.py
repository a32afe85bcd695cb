"""Soft token votes: no token outvotes a sequence, unmeasured tokens say nothing, and the
evaluation's votes are those of routers built with the query statistics (exact)."""

import pytest
import torch
from _routed_lora import ADAPTERS, calibrate, make_peft_model, module_token_scores, token_ids

from seqr import BruteForceRouter
from seqr.core.errors import ConfigError, ShapeError
from seqr.core.model_routing import (
    ModelRoutingConfig,
    RoutedModel,
    build_routed_modules,
    reference_statistics,
)
from seqr.core.model_routing.soft_votes import soft_votes, vote_statistics
from seqr.sim.eval_scores import score_heldout
from seqr.sim.eval_soft_votes import pool_votes


def test_one_token_far_inside_a_domain_does_not_outvote_the_sequence():
    # Adapter 0 leads on one token by 40 z; adapter 1 leads on the other nine by 1 each.
    decisions = torch.zeros(1, 10, 2)
    decisions[0, 0, 0] = 40.0
    decisions[0, 1:, 1] = 1.0
    measured = torch.ones(1, 10, dtype=torch.bool)
    assert decisions.mean(dim=1).argmax(-1).item() == 0  # the token mean follows the outlier
    votes = soft_votes(decisions, measured)
    assert votes.argmax(-1).item() == 1
    torch.testing.assert_close(votes.sum(-1), torch.ones(1, dtype=torch.float64))


def test_unmeasured_tokens_do_not_vote():
    decisions = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0))
    measured = torch.ones(3, 6, dtype=torch.bool)
    measured[:, 0] = False  # the first token (the token rule leaves it out)
    before = soft_votes(decisions, measured)
    decisions[:, 0] = torch.tensor([100.0, -100.0, 0.0, 0.0])
    torch.testing.assert_close(soft_votes(decisions, measured), before)


def test_votes_and_their_statistics_refuse_wrong_shapes():
    with pytest.raises(ShapeError, match="batch, tokens, adapters"):
        soft_votes(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ShapeError, match=">= 2 sequences"):
        vote_statistics(torch.ones(1, 3))
    mean, std = vote_statistics(torch.ones(4, 3))  # every input the same share: no 0 std
    assert (std > 0).all() and torch.equal(mean, torch.ones(3))


def _router_votes(model, modules, batches):
    """Vote shares from routers that hold the statistics themselves (module.scores), each
    token's decision the mean over the modules that measured it."""
    out = []
    for batch in batches:
        scored = module_token_scores(model, modules, batch)
        z = torch.stack([scores for scores, _ in scored]).double()  # (M, B, T, N)
        keep = torch.stack([keep for _, keep in scored])  # (M, B, T)
        total = (z * keep.unsqueeze(-1)).sum(0)
        count = keep.sum(0)
        out.append(soft_votes(total / count.clamp_min(1).unsqueeze(-1), count > 0))
    return torch.cat(out)


def _query_world():
    model = make_peft_model(seed=0)
    stats = calibrate(model)
    validation = list(torch.split(token_ids(8, 12, seed=5), 4))
    test = list(torch.split(token_ids(8, 12, seed=6), 4))
    scores = score_heldout(model, ADAPTERS, stats, validation=validation, test=test,
                           soft_vote_temperature=2.0)  # fmt: skip
    queries = reference_statistics(
        model, ADAPTERS, validation, score=stats[ADAPTERS[0]].score, per_sequence=True
    )
    return model, stats, validation, test, scores, queries


def test_soft_votes_equal_those_of_routers_built_with_the_query_statistics():
    model, stats, validation, test, scores, queries = _query_world()
    pool = pool_votes(model, ADAPTERS, scores.calibrations["seqr_queries"],
                      stats[ADAPTERS[0]].score, validation, 2.0)  # fmt: skip
    seqr = build_routed_modules(model, ADAPTERS, stats=queries)
    brute = build_routed_modules(model, ADAPTERS, stats=queries, router_factory=BruteForceRouter)
    torch.testing.assert_close(pool, _router_votes(model, seqr, validation))
    torch.testing.assert_close(scores.test_votes["seqr"], _router_votes(model, seqr, test))
    torch.testing.assert_close(scores.test_votes["brute_force"], _router_votes(model, brute, test))
    votes = scores.test_votes["seqr"]
    assert not torch.allclose(votes, votes[:, :1].expand_as(votes))  # the adapters' shares differ


def test_routed_model_soft_votes_equal_the_evaluations_standardised_over_the_pool():
    model, stats, validation, test, scores, queries = _query_world()
    pool = pool_votes(model, ADAPTERS, scores.calibrations["seqr_queries"],
                      stats[ADAPTERS[0]].score, validation, 2.0)  # fmt: skip
    config = ModelRoutingConfig(aggregation="soft_vote", vote_temperature=2.0)
    routed = RoutedModel(model, config, adapters=ADAPTERS, stats=queries)
    measured = routed.measure_vote_statistics(validation)
    mean, std = vote_statistics(pool)
    as_tensor = torch.tensor([measured[a] for a in ADAPTERS], dtype=torch.float64)  # (N, 2)
    torch.testing.assert_close(as_tensor, torch.stack([mean, std], dim=1))
    routed = RoutedModel(model, config, adapters=ADAPTERS, stats=queries, vote_stats=measured)
    decision = routed.route_sequences(torch.cat(test))
    expected = (scores.test_votes["seqr"] - mean) / std
    torch.testing.assert_close(decision.scores, expected)
    assert decision.indices.tolist() == expected.argmax(-1).tolist()


@pytest.mark.parametrize(
    ("aggregation", "vote_stats", "message"),
    [
        ("mean", {a: (0.3, 0.1) for a in ADAPTERS}, "set aggregation='soft_vote'"),
        ("soft_vote", {ADAPTERS[0]: (0.3, 0.1)}, "vote_stats lack adapters"),
        ("soft_vote", {a: (0.3, float("nan")) for a in ADAPTERS}, "non-finite mean or a std"),
        ("soft_vote", {a: (0.3, 0.0) for a in ADAPTERS}, "non-finite mean or a std"),
    ],
)
def test_vote_statistics_that_cannot_standardise_are_refused(aggregation, vote_stats, message):
    model = make_peft_model(seed=0)
    with pytest.raises(ConfigError, match=message):
        RoutedModel(model, ModelRoutingConfig(aggregation=aggregation), adapters=ADAPTERS,
                     vote_stats=vote_stats)  # fmt: skip
