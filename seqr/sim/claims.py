"""Routing accuracy split by whether any adapter claims a sequence.

Under query statistics each adapter's decision score (the mean of its module z-scores, or its
soft token vote share) is standardised over the traffic
(seqr.core.model_routing.reference.decision_standardized, soft_votes.vote_statistics), so a
top decision score below 0
means no adapter finds the sequence more its own than an average input does. Those rows are
where the router is least reliable (docs/RESULTS.md, "A third set": routed right about half as
often as the rest), and `seqr serve` returns the same z-scores per request (its ``seqr``
field), so a caller can tell such a request apart.
"""

from __future__ import annotations

from typing import Any

import torch

from seqr.sim.significance import wilson_interval

UNCLAIMED_BELOW = 0.0  # a decision z-score below the adapter's mean over the traffic
GROUPS = ("claimed", "unclaimed")


def claim_split(
    decision_scores: torch.Tensor, choice: torch.Tensor, labels: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """{"claimed": ..., "unclaimed": ...}: each group's share of the rows and its accuracy with
    a Wilson 95% interval (None for an empty group). ``decision_scores``: (S, N)."""
    unclaimed = decision_scores.max(dim=-1).values < UNCLAIMED_BELOW
    right = choice == labels
    return {
        group: _group(int(right[rows].sum()), int(rows.sum()), len(labels))
        for group, rows in zip(GROUPS, (~unclaimed, unclaimed), strict=True)
    }


def _group(correct: int, total: int, rows: int) -> dict[str, Any]:
    return {
        "share": total / max(rows, 1),
        "correct": correct,
        "total": total,
        "accuracy": correct / total if total else None,
        "ci95": list(wilson_interval(correct, total)) if total else None,
    }


def pooled_split(splits: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The split over several runs' test sequences together (seeds of one simulation)."""
    counts = {g: [sum(s[g][k] for s in splits) for k in ("correct", "total")] for g in GROUPS}
    rows = sum(total for _, total in counts.values())
    return {g: _group(correct, total, rows) for g, (correct, total) in counts.items()}


def claim_sentence(split: dict[str, dict[str, Any]] | None, calibration: str) -> str | None:
    """The report's sentence on the split (None for a report written before it existed)."""
    if not split:
        return None
    claimed, unclaimed = split["claimed"], split["unclaimed"]

    def rate(group: dict[str, Any]) -> str:
        if not group["total"]:
            return "— (none)"
        low, high = group["ci95"]
        return f"{group['accuracy']:.1%} (95% interval {low:.1%}–{high:.1%})"

    return (
        f"{unclaimed['total']} of {claimed['total'] + unclaimed['total']} test sequences "
        f"({unclaimed['share']:.1%}) were claimed by no adapter: every adapter's decision "
        f"z-score under {calibration} was below 0, its mean over the unlabeled traffic. "
        f"{calibration} routed {rate(unclaimed)} of those to their own domain's adapter and "
        f"{rate(claimed)} of the rest. A low top score is the router's own warning that an "
        "input fits none of the adapters well (`seqr serve` returns the scores per request)."
    )
