"""The loss check (seqr.core.model_routing.loss_check) on the held-out rows of an evaluation.

Every row whose two best adapters under soft votes are close is scored by both adapters'
next-token loss on the row itself (the prompt, as `seqr serve` would see it); brute force's
ranking gets the same check, so its agreement with SEQR covers the checked choice too. The
losses come from seqr.sim.eval_losses.pair_losses (each adapter merged exactly), each pair
once, and go into the score dump so the report's accuracy can be reproduced from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from seqr.core.model_routing.loss_check import check_pairs, shortlist
from seqr.sim.eval_losses import counting, pair_losses


@dataclass(frozen=True)
class LossChecked:
    choice: torch.Tensor  # (S,) every row's checked adapter (validation first, as the scores)
    brute_choice: torch.Tensor  # (S_test,) brute force's ranking, checked the same way
    pair_loss: torch.Tensor  # (S, 2) loss under the first and second adapter, NaN if not close
    close: torch.Tensor  # (S,) bool: the rows checked
    losses: dict[tuple[int, str], float]  # (row, adapter name) -> every loss computed


def loss_checked(
    model: Any,
    adapters: tuple[str, ...],
    ids: torch.Tensor,
    scores: torch.Tensor,
    brute_scores: torch.Tensor,
    is_test: torch.Tensor,
    batch_size: int,
    stage: Callable[[str, int], Callable[[int], None]] | None = None,
) -> LossChecked:
    """``scores`` (S, N): every row's standardised soft votes; ``brute_scores`` (S_test, N):
    brute force's for the test rows; ``ids`` (S, T) the rows in the same order."""
    short, brute = shortlist(scores), shortlist(brute_scores)
    every_row, test_rows = list(range(len(ids))), torch.nonzero(is_test).flatten().tolist()
    wanted: dict[int, set[int]] = {}
    for s, rows in ((short, every_row), (brute, test_rows)):
        for r in s.rows():
            wanted.setdefault(rows[r], set()).update((int(s.first[r]), int(s.second[r])))
    needed = sorted(wanted)
    # pair_losses takes plans of one adapter per row: the k-th plan names each row's k-th
    # candidate (its last one again where it has fewer); each pair is computed once.
    candidates = [sorted(wanted[row]) for row in needed]
    width = max(map(len, candidates), default=0)
    plans = [[adapters[c[min(k, len(c) - 1)]] for c in candidates] for k in range(width)]
    pairs = sum(map(len, candidates))
    step = counting(stage, "prompt loss of the close pairs (loss check)", pairs)
    computed = pair_losses(model, ids[needed], plans, batch_size, step) if needed else {}
    losses = {(needed[i], name): v for (i, name), v in computed.items()}

    def lookup(positions: list[int]) -> Callable[[list[int], list[int]], torch.Tensor]:
        def losses_of(rows: list[int], indices: list[int]) -> torch.Tensor:
            pairs = zip(rows, indices, strict=True)
            return torch.tensor([losses[positions[r], adapters[a]] for r, a in pairs],
                                dtype=torch.float64)  # fmt: skip

        return losses_of

    choice, first_loss, second_loss = check_pairs(short, lookup(every_row))
    brute_choice, _, _ = check_pairs(brute, lookup(test_rows))
    pair_loss = torch.stack([first_loss, second_loss], 1)
    return LossChecked(choice, brute_choice, pair_loss, short.close, losses)
