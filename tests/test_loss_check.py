"""The loss check: SEQR's two best adapters, where close, decided by the prompt's own loss."""

import math

import pytest
import torch

from seqr.core.errors import ConfigError, ShapeError
from seqr.core.model_routing.loss_check import LOSS_CHECK_MARGIN, checked_choice, shortlist


def test_only_pairs_within_the_margin_are_checked():
    scores = torch.tensor([[2.0, 1.5, -1.0], [3.0, 0.0, 1.0], [0.1, 0.2, 0.15]])
    short = shortlist(scores, margin=1.0)
    assert short.first.tolist() == [0, 0, 1]
    assert short.second.tolist() == [1, 2, 2]
    assert short.close.tolist() == [True, False, True]
    assert short.rows() == [0, 2]


def test_the_runner_up_wins_only_with_a_strictly_lower_loss():
    short = shortlist(torch.tensor([[1.0, 0.9], [1.0, 0.9], [1.0, 0.9], [5.0, 0.0]]))
    first = torch.tensor([2.0, 2.0, 2.0, 9.0])
    second = torch.tensor([1.0, 2.0, math.nan, 1.0])  # lower, tied, unknown, far pair
    assert checked_choice(short, first, second).tolist() == [1, 0, 0, 0]


def test_an_adapter_that_may_not_take_the_row_is_never_close_nor_chosen():
    scores = torch.tensor([[1.0, float("-inf")], [float("-inf"), 0.5]])
    short = shortlist(scores)
    assert short.first.tolist() == [0, 1] and not short.close.any()
    assert checked_choice(short, torch.ones(2), torch.zeros(2)).tolist() == [0, 1]


def test_one_adapter_is_never_checked():
    short = shortlist(torch.tensor([[0.3], [-2.0]]))
    assert short.first.tolist() == [0, 0] and short.rows() == []


def test_the_default_margin_is_what_is_used_without_one():
    gap = LOSS_CHECK_MARGIN * 0.99
    assert shortlist(torch.tensor([[gap, 0.0]])).close.item()
    assert not shortlist(torch.tensor([[LOSS_CHECK_MARGIN, 0.0]])).close.item()


def test_bad_shapes_and_margins_are_refused_with_what_to_pass():
    with pytest.raises(ShapeError, match="rows, adapters"):
        shortlist(torch.zeros(3))
    with pytest.raises(ConfigError, match=">= 0"):
        shortlist(torch.zeros(2, 2), margin=float("nan"))
    with pytest.raises(ShapeError, match="one loss per row"):
        checked_choice(shortlist(torch.zeros(2, 2)), torch.zeros(3), torch.zeros(2))


def test_prompt_losses_are_each_rows_own_loss_whatever_the_padding():
    from _routed_lora import ADAPTERS, make_peft_model, token_ids

    from seqr.core.model_routing.loss_check import prompt_losses
    from seqr.sim.lm_loss import next_token_losses

    model = make_peft_model(seed=0)
    ids = token_ids(6, 12, seed=3)
    names = [ADAPTERS[i % 3] for i in range(6)]  # more rows than one pass takes
    whole = prompt_losses(model, ids, torch.ones_like(ids), names)
    direct = next_token_losses(model(input_ids=ids, adapter_names=names).logits, ids)
    torch.testing.assert_close(whole, direct.double(), rtol=1e-5, atol=1e-6)

    short = ids[:2, :7]  # the same prompts, shorter, padded to 12 on either side
    alone = prompt_losses(model, short, torch.ones_like(short), names[:2])
    pad = torch.zeros(2, 5, dtype=ids.dtype)
    ones, zeros = torch.ones(2, 7, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)
    left = prompt_losses(model, torch.cat([pad, short], 1), torch.cat([zeros, ones], 1), names[:2])
    right = prompt_losses(model, torch.cat([short, pad], 1), torch.cat([ones, zeros], 1), names[:2])
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-6)

    one = prompt_losses(model, ids[:1, :1], torch.ones(1, 1, dtype=torch.long), names[:1])
    assert one.isnan().all()  # one token predicts nothing
    with pytest.raises(ShapeError, match="adapter names"):
        prompt_losses(model, ids, torch.ones_like(ids), names[:2])


def test_the_check_is_configured_only_on_top_of_per_sequence_soft_votes():
    from seqr.core.model_routing import ModelRoutingConfig

    assert ModelRoutingConfig(aggregation="soft_vote", loss_check_margin=0.5).loss_check_margin
    with pytest.raises(ConfigError, match="per_sequence soft_vote"):
        ModelRoutingConfig(aggregation="mean", loss_check_margin=0.5)
    with pytest.raises(ConfigError, match="a number >= 0"):
        ModelRoutingConfig(aggregation="soft_vote", loss_check_margin=-0.5)
