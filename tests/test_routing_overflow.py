"""Numeric overflow across the dtype boundary: a B that is finite in float32 but whose B^T B
or scores overflow there never wins an input, in any router, and a NaN never ranks first."""

from __future__ import annotations

import pytest
import torch

from seqr.core.model_routing.collect import ScoreSums
from seqr.core.model_routing.config import ModelRoutingConfig
from seqr.core.model_routing.per_sequence import decide
from seqr.core.model_routing.per_token import topk_weights
from seqr.core.routing import ArrowRouter, BruteForceRouter, SeqrRouter, SpectrRouter
from seqr.core.routing.base import finite_or_lowest

ROUTERS = (SeqrRouter, BruteForceRouter, SpectrRouter)  # the exact-norm routers


def _world(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 16, generator=gen) / 4  # (r, d_in), shared
    honest = [torch.randn(8, 4, generator=gen) * 0.1 for _ in range(3)]  # (d_out, r)
    x = torch.randn(32, 16, generator=gen)
    return a, honest, x


@pytest.mark.parametrize("router_cls", ROUTERS)
@pytest.mark.parametrize("with_stats", [True, False])
def test_huge_b_finite_in_float32_never_wins_an_input(router_cls: type, with_stats: bool) -> None:
    # Prepare: three honest adapters and an attacker whose B entries are 1e20 (finite in
    # float32; B^T B and ||B A x||^2 are not).
    a, honest, x = _world()
    attacker = torch.randn(8, 4, generator=torch.Generator().manual_seed(9)) * 1e20
    stats = {"mean": [0.3] * 4, "std": [0.1] * 4} if with_stats else {}
    reference = router_cls(a, honest, **({"mean": [0.3] * 3, "std": [0.1] * 3} if stats else {}))
    # Execute
    router = router_cls(a, [*honest, attacker], **stats)
    scores = router.scores(x)
    values, indices = router.topk(x, k=2)
    # Assert: the attacker's score is the lowest possible, never NaN, and the decision over
    # the honest adapters is exactly the one without the attacker.
    assert torch.isneginf(scores[:, 3]).all()
    assert not torch.isnan(scores).any() and not torch.isnan(values).any()
    assert (indices != 3).all()
    torch.testing.assert_close(indices[:, 0], reference.route(x)[:, 0])


def test_arrow_prototype_ignores_the_scale_of_b() -> None:
    # ARROW scores with a unit singular vector: a huge B is no overflow and no advantage.
    a, honest, x = _world()
    router = ArrowRouter(a, [*honest, honest[0] * 1e20])
    scores = router.scores(x)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:, 3], scores[:, 0])


def test_nan_and_inf_scores_rank_last() -> None:
    scores = torch.tensor([[float("nan"), 1.0, float("inf"), -2.0]])
    cleaned = finite_or_lowest(scores)
    assert cleaned.tolist() == [[float("-inf"), 1.0, float("-inf"), -2.0]]
    assert torch.topk(scores, 1).indices.item() == 0  # what torch does: NaN first
    assert torch.topk(cleaned, 1).indices.item() == 1


@pytest.mark.parametrize("weighting", ["softmax", "uniform"])
def test_per_token_weights_of_unscorable_adapters_are_zero_not_nan(weighting: str) -> None:
    scores = torch.tensor(
        [
            [float("nan"), 2.0, 1.0],  # one adapter unscorable: the others share the weight
            [float("nan"), float("inf"), float("-inf")],  # none scorable: nothing is applied
        ]
    )
    indices, weights = topk_weights(scores, 2, weighting)
    assert not torch.isnan(weights).any()
    assert indices[0].tolist() == [1, 2]
    assert weights[0].sum().item() == pytest.approx(1.0)
    assert weights[1].tolist() == [0.0, 0.0]


def test_per_sequence_decision_with_an_unscorable_adapter_and_padding() -> None:
    # Two sequences of 3 tokens, the second padded on its first token; adapter 2 overflows
    # on every token, including the padded one (0 * -inf would be NaN).
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    scores = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.1, 0.0], [0.7, 0.2, 0.0]])
    scores = scores.unsqueeze(0).repeat(2, 1, 1)  # (B, T, N)
    scores[..., 2] = float("-inf")
    scores[1, 0, 0] = float("nan")  # garbage on padding must not leak into the sum
    sums = ScoreSums()
    sums.add("m", finite_or_lowest(scores), mask)
    decision = decide(sums, ModelRoutingConfig(), ("a", "b", "c"))
    # Row 0: a (0.5 + 2.0 + 0.7) / 3 beats b (1.0 + 0.1 + 0.2) / 3. Row 1: a (2.0 + 0.7) / 2
    # beats b (0.1 + 0.2) / 2 only if the NaN on its padded token was dropped.
    assert decision.indices.tolist() == [0, 0]
    assert decision.scores[1, 0].item() == pytest.approx(1.35)
    assert torch.isneginf(decision.scores[:, 2]).all()
    assert not torch.isnan(decision.scores).any() and not torch.isnan(decision.margin).any()


def test_every_adapter_unscorable_gives_a_tie_not_nan() -> None:
    mask = torch.ones(1, 2, dtype=torch.long)
    sums = ScoreSums()
    sums.add("m", torch.full((1, 2, 3), float("-inf")), mask)
    decision = decide(sums, ModelRoutingConfig(), ("a", "b", "c"))
    assert decision.margin.tolist() == [0.0]
