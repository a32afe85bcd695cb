"""The prompt's own loss decides between the two adapters SEQR scores closest.

SEQR's scores rank the adapters by how strongly each one's update responds to the input; on
most inputs the first is far ahead and routing ends there. Where the first two are close, the
remaining mistakes concentrate (the right adapter is second), and there the text itself can
tell them apart: the adapter that predicts the prompt's tokens better (lower mean next-token
loss) is the one trained on text like it. Measured on the project's ten domains and on the
machine's text types (docs/RESULTS.md): on the ten domains' misrouted test rows the right
adapter had the lower loss on 70 of 74.

The check costs two forward passes of the prompt, only for the close rows (a fifth of them on
the ten domains, half on four sections of one dictionary), and uses nothing any submitter
sends beyond the admitted weights: no statistics, no claims. SEQR's ranking stays exact (brute
force ranks the same); the check is the same function of the same ranking for any router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from seqr.core.errors import ConfigError, ShapeError

# In units of the standardised decision scores (soft votes' z-scores): pairs closer than this
# are checked. 0.25-1.0 measured, each better than no check; 1.0 checks about a fifth of the
# ten domains' rows (docs/RESULTS.md).
LOSS_CHECK_MARGIN = 1.0
# Rows per forward pass and positions per slice of the vocabulary head in prompt_losses: its
# memory stays at a few (rows, positions, hidden) and (rows, slice, vocabulary) blocks.
_ROWS, _POSITIONS = 4, 256


@dataclass(frozen=True)
class Shortlist:
    """Each row's two best adapters and whether their scores are close enough to check."""

    first: torch.Tensor  # (S,) long: the highest score
    second: torch.Tensor  # (S,) long: the runner-up (the first itself with one adapter)
    close: torch.Tensor  # (S,) bool: second within the margin of first

    def rows(self) -> list[int]:
        """The rows whose pair the prompt's loss decides."""
        return torch.nonzero(self.close).flatten().tolist()


def shortlist(scores: torch.Tensor, margin: float = LOSS_CHECK_MARGIN) -> Shortlist:
    """The two highest of each row of ``scores`` (S, N); an adapter that may not take the row
    scores -inf (never close, never chosen). Non-finite margins are never close."""
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ShapeError(f"scores must be (rows, adapters); got {tuple(scores.shape)}")
    if not margin >= 0:
        raise ConfigError(f"the loss-check margin must be >= 0; got {margin}")
    if scores.shape[1] == 1:
        first = torch.zeros(scores.shape[0], dtype=torch.long)
        return Shortlist(first, first, torch.zeros_like(first, dtype=torch.bool))
    values, indices = scores.double().topk(2, dim=-1)
    gap = values[:, 0] - values[:, 1]
    close = torch.isfinite(gap) & (gap < margin)
    return Shortlist(indices[:, 0], indices[:, 1], close)


def checked_choice(
    short: Shortlist, first_loss: torch.Tensor, second_loss: torch.Tensor
) -> torch.Tensor:
    """(S,) each row's adapter: the runner-up where the pair is close and the prompt's loss
    under it is strictly lower, else the first (a NaN loss keeps the first). Losses of rows
    that are not close are not read."""
    shape = tuple(short.first.shape)
    if tuple(first_loss.shape) != shape or tuple(second_loss.shape) != shape:
        raise ShapeError(f"need one loss per row {shape}; got {tuple(first_loss.shape)}, "
                         f"{tuple(second_loss.shape)}")  # fmt: skip
    lower = second_loss.double() < first_loss.double()
    return torch.where(short.close & lower, short.second, short.first)


def check_pairs(
    short: Shortlist, losses_of: Callable[[list[int], list[int]], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, first's loss, second's loss), each (S,), the losses NaN where not close.
    ``losses_of(rows, adapters)``: the loss of each listed row under the listed adapter,
    asked once for every close row's first, then its second."""
    rows = short.rows()
    first_loss = torch.full(tuple(short.first.shape), float("nan"), dtype=torch.float64)
    second_loss = first_loss.clone()
    if rows:
        pairs = [int(short.first[r]) for r in rows] + [int(short.second[r]) for r in rows]
        both = losses_of(rows * 2, pairs).detach().double().cpu()
        first_loss[rows], second_loss[rows] = both[: len(rows)], both[len(rows) :]
    return checked_choice(short, first_loss, second_loss), first_loss, second_loss


@torch.no_grad()
def prompt_losses(
    peft_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: list[str]
) -> torch.Tensor:
    """(B,) float64: each sequence's mean next-token cross-entropy over its own tokens (either
    padding side) under its adapter (peft's ``adapter_names``, one per row); NaN for a
    sequence of fewer than two tokens."""
    if len(adapters) != input_ids.shape[0] or attention_mask.shape != input_ids.shape:
        raise ShapeError(f"need (B, T) ids and mask and B adapter names; got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, "
                         f"{len(adapters)}")  # fmt: skip
    head = peft_model.get_output_embeddings()
    out = []
    for start in range(0, input_ids.shape[0], _ROWS):
        ids, mask = input_ids[start : start + _ROWS], attention_mask[start : start + _ROWS]
        hidden = peft_model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.long().cumsum(dim=-1) - 1).clamp_min(0),
            adapter_names=adapters[start : start + _ROWS],
            output_hidden_states=True,
            logits_to_keep=1,  # the head runs below, slice by slice
            use_cache=False,
        ).hidden_states[-1]  # after the final norm: what the head reads
        real = mask.bool()
        scored = real[:, :-1] & real[:, 1:]  # position t predicts token t + 1
        total = torch.zeros(len(ids), dtype=torch.float64, device=ids.device)
        for s in range(0, ids.shape[1] - 1, _POSITIONS):
            e = min(s + _POSITIONS, ids.shape[1] - 1)
            logits = head(hidden[:, s:e]).float()
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, s + 1 : e + 1], reduction="none")
            total += torch.where(scored[:, s:e], loss.double(), 0.0).sum(dim=1)
        count = scored.sum(dim=1)
        out.append(torch.where(count > 0, total / count.clamp_min(1), float("nan")))
    return torch.cat(out)
