"""FedAvg weights that no single member can decide.

FedAvg (McMahan et al. 2017) weights each client's update by its example count, a number the
client states. One member claiming 2^53 examples would then BE the average (cosine 1.0 with
its own B). Two bounds make the weights robust while honest members keep proportional ones:

1. each count is clipped to ``max_examples`` (the group setting group-max-examples; larger
   claims are refused outright before this, see seqr.operator.group_replies);
2. no member's share exceeds ``max(max_share, 1 / n)``: shares above the cap are set to the
   cap and the rest is shared among the others in proportion to their counts, repeated until
   none is above it ("water-filling", the same projection as capped simplex weights).

With n honest members of similar size neither bound changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from seqr.core.errors import ValueCheckError

__all__ = ["capped_shares"]


def capped_shares(counts: Sequence[int], *, max_examples: int, max_share: float) -> list[float]:
    """Weight shares (summing to 1) for members with these example counts (each >= 1)."""
    if not counts:
        raise ValueCheckError("no member to weight")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueCheckError(f"example counts must be integers >= 1, got {list(counts)[:5]}")
    if not 0 < max_share <= 1:
        raise ValueCheckError(f"max_share {max_share} must be in (0, 1]")
    clipped = [min(c, max_examples) for c in counts]
    cap = max(max_share, 1.0 / len(clipped))
    shares = [0.0] * len(clipped)
    free = set(range(len(clipped)))
    remaining = 1.0
    while free:
        total = sum(clipped[i] for i in free)
        over = [i for i in free if clipped[i] * remaining / total > cap]
        if not over:
            for i in free:
                shares[i] = clipped[i] * remaining / total
            break
        for i in over:
            shares[i] = cap
            free.discard(i)
            remaining -= cap
    return shares
