"""Per-sequence routing: module scores aggregated over layers and tokens into one adapter.

arXiv 2509.18093 (routing granularity): serving users want one adapter per request. The mean of
z-scores over the measured tokens (unpadded; the token rule of seqr.core.measurement) and
modules is the default (92% in the project's measurement); a vote of every (token, module)
argmax and soft token votes (soft_votes.py) are the alternatives. The batch then runs with
mixed adapters through peft's ``adapter_names`` (one LoRA per row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from seqr.core.errors import DataError, ShapeError
from seqr.core.model_routing.collect import ScoreSums
from seqr.core.model_routing.config import ModelRoutingConfig
from seqr.core.model_routing.loss_check import check_pairs, prompt_losses, shortlist
from seqr.core.routing.base import finite_or_lowest


@dataclass(frozen=True)
class RoutingDecision:
    """One adapter per sequence, with the evidence for it."""

    adapters: tuple[str, ...]  # the N routed adapters; indices below point into this
    indices: torch.Tensor  # (B,) int64: the chosen adapter of each sequence
    scores: torch.Tensor  # (B, N): mean score (or vote share) over valid tokens and modules
    margin: torch.Tensor  # (B,): the chosen's score minus the best other; inf when N == 1
    # (B,) "kept" / "changed" where the loss check decided the sequence (loss_check.py)
    loss_check: tuple[str | None, ...] | None = None

    @property
    def names(self) -> list[str]:
        """The chosen adapter's name per sequence (what peft's adapter_names takes)."""
        return [self.adapters[i] for i in self.indices.tolist()]


def check_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) as (B, T) tensors; every row needs a valid token."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        raise ShapeError(f"input_ids must be a (batch, tokens) tensor, got shape {shape}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else None
        raise ShapeError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got shape {shape}"
        )
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise DataError("attention_mask must hold only 0 (padding) and 1 (token)")
    empty = torch.nonzero(attention_mask.sum(dim=1) == 0).flatten().tolist()
    if empty:
        raise DataError(f"sequences {empty} are all padding; each needs at least one token")
    return input_ids, attention_mask


def decide(
    sums: ScoreSums,
    config: ModelRoutingConfig,
    adapters: tuple[str, ...],
    vote_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RoutingDecision:
    """Aggregate per-sequence sums (collect.py) into one adapter per sequence.

    vote_stats: soft_vote only, each adapter's (mean, std) vote share over a pool of
    unlabeled inputs, (N,) each; the shares are standardised with them."""
    if sums.score_sum is None or not sums.modules_seen:
        raise ShapeError("no routed module ran in the first pass; nothing to aggregate")
    if config.aggregation == "soft_vote":
        votes = sums.tokens.votes(config.vote_temperature)
        if vote_stats is not None:
            mean, std = vote_stats
            votes = (votes - mean.to(votes)) / std.to(votes)
        scores = finite_or_lowest(votes)
    else:
        # mean: over modules, of each module's mean over the tokens the token rule measured
        # (seqr.core.measurement); vote: the share of (token, module) votes.
        total = sums.score_sum if config.aggregation == "mean" else sums.vote_sum
        assert total is not None  # both are set by the first module
        if config.aggregation == "mean" or sums.votes_cast is None:
            count = torch.full((total.shape[0],), len(sums.modules_seen)).to(total)  # (B,)
        else:
            count = sums.votes_cast.to(total).clamp_min(1)
        scores = finite_or_lowest(total / count.unsqueeze(-1))  # (B, N); unscorable: -inf
    if scores.shape[-1] == 1:
        indices = torch.zeros(scores.shape[0], dtype=torch.int64, device=scores.device)
        margin = torch.full((scores.shape[0],), float("inf"), device=scores.device)
    else:
        top = torch.topk(scores, 2, dim=-1)
        indices, margin = top.indices[:, 0], top.values[:, 0] - top.values[:, 1]
        margin = torch.nan_to_num(margin, nan=0.0)  # two -inf scores: a tie, not NaN
    return RoutingDecision(adapters=adapters, indices=indices, scores=scores, margin=margin)


def check_by_loss(
    peft_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decision: RoutingDecision,
    margin: float,
) -> RoutingDecision:
    """``decision`` with each sequence whose two best scores are within ``margin`` given to
    the one of the two with the lower loss on the sequence itself (loss_check.py)."""
    short = shortlist(decision.scores.cpu(), margin)

    def losses_of(rows: list[int], adapters: list[int]) -> torch.Tensor:
        names = [decision.adapters[a] for a in adapters]
        return prompt_losses(peft_model, input_ids[rows], attention_mask[rows], names)

    picked, _, _ = check_pairs(short, losses_of)
    chosen = picked.to(decision.indices.device)
    outcome: list[str | None] = [None] * len(decision.indices)
    for r in short.rows():
        outcome[r] = "kept" if int(chosen[r]) == int(short.first[r]) else "changed"
    # the chosen's score minus the best other's: negative where the runner-up took it
    others = decision.scores.scatter(-1, chosen[:, None], float("-inf")).amax(dim=-1)
    chosen_scores = decision.scores.gather(-1, chosen[:, None]).squeeze(-1)
    margin_now = torch.where(torch.isfinite(others), chosen_scores - others, decision.margin)
    return dataclasses.replace(
        decision, indices=chosen, margin=margin_now, loss_check=tuple(outcome)
    )
