"""Soft token votes: a per-sequence decision that no single token can dominate.

The default per-sequence decision is the mean over tokens of each token's decision score (the
mean over modules of its z-scores). A few tokens far inside one adapter's domain (a line of
code in a documentation chunk) then move the whole sequence. Soft votes cap each token's say:
every measured token turns its decision scores into a distribution over the adapters,
softmax(d_t / temperature), and the sequence takes the mean of those distributions. Over a
pool of unlabeled inputs (the query statistics' pool) each adapter's vote share is then
standardised, as the default standardises each adapter's decision score
(reference.decision_standardized): an adapter that wins many tokens of every input would
otherwise take foreign sequences.

Still exact: the per-token scores are SEQR's z-scores, which brute force reproduces, and the
aggregation is the same function of them for any router (seqr.sim.eval_soft_votes checks it).
Measured offline on five simulations, two domain sets (docs/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqr.core.errors import ShapeError

SOFT_VOTE_TEMPERATURE = 2.0  # z-score units; 1-4 measured alike (docs/RESULTS.md)


def soft_votes(
    token_decisions: torch.Tensor,
    measured: torch.Tensor,
    temperature: float = SOFT_VOTE_TEMPERATURE,
) -> torch.Tensor:
    """(B, N) mean over each sequence's measured tokens of softmax(d_t / temperature), for
    per-token decision scores ``token_decisions`` (B, T, N) and ``measured`` (B, T) bool."""
    if token_decisions.ndim != 3 or tuple(measured.shape) != tuple(token_decisions.shape[:2]):
        raise ShapeError(
            f"token decisions must be (batch, tokens, adapters) with a (batch, tokens) mask; "
            f"got {tuple(token_decisions.shape)} and {tuple(measured.shape)}"
        )
    shares = torch.softmax(token_decisions.double() / temperature, dim=-1)
    keep = measured.unsqueeze(-1)
    total = torch.where(keep, shares, torch.zeros((), dtype=shares.dtype)).sum(dim=1)
    return total / keep.sum(dim=1).clamp_min(1)


@dataclass
class TokenDecisions:
    """Each token's decision scores, summed module by module as a pass runs: a token's
    decision is the mean of its scores over the modules that measured it."""

    total: torch.Tensor | None = None  # (B, T, N) float64: sum of the measured scores
    count: torch.Tensor | None = None  # (B, T) float64: modules that measured each token

    def add(self, scores: torch.Tensor, measured: torch.Tensor) -> None:
        """One module's (B, T, N) scores (z-scores) and its (B, T) measured tokens."""
        keep = measured.to(torch.bool)
        zero = torch.zeros((), dtype=torch.float64)
        part = torch.where(keep.unsqueeze(-1), scores.double(), zero)
        count = keep.to(torch.float64)
        self.total = part if self.total is None else self.total + part
        self.count = count if self.count is None else self.count + count

    def votes(self, temperature: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) soft_votes of the tokens any module measured; ``allowed`` (N,) bool: the
        adapters that may take a share (the others get none)."""
        if self.total is None or self.count is None:
            raise ShapeError("soft votes need per-token scores; no module added any")
        decisions = self.total / self.count.clamp_min(1).unsqueeze(-1)
        if allowed is not None:
            decisions = decisions.masked_fill(~allowed.to(decisions.device), float("-inf"))
        return soft_votes(decisions, self.count > 0, temperature)


def vote_statistics(
    pool_votes: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each adapter's (mean, std) of its vote share over a pool (P, N) of unlabeled inputs,
    each input weighing the same or by ``weights`` (P,), summing to 1; a std of 0 (an adapter
    that takes the same share of every input) is floored."""
    if pool_votes.ndim != 2 or len(pool_votes) < 2:
        raise ShapeError(f"the pool needs >= 2 sequences of votes, got {tuple(pool_votes.shape)}")
    if weights is None:
        mean = pool_votes.mean(dim=0)
        std = pool_votes.std(dim=0, correction=0)
    else:
        mean = weights @ pool_votes
        std = (weights @ (pool_votes - mean) ** 2).sqrt()
    return mean, std.clamp_min(1e-12)
