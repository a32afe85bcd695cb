"""Confidence intervals and paired tests for routing accuracy (what tells two methods apart).

Hand-written because scipy and statsmodels are not in the environment and each is a few
lines: the Wilson score interval (Wilson 1927; Agresti & Coull 1998 recommend it over the
normal interval for proportions near 0 or 1) and McNemar's exact test, the two-sided binomial
test on the discordant pairs (McNemar 1947; Fagerland et al. 2013 for the exact form).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from seqr.core.errors import ConfigError

Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) Wilson score interval of successes / trials; (0, 1) for no trials."""
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ConfigError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    # At p = 0 or 1 the bound is exactly 0 or 1; rounding would leave 1e-16 off it.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class McNemar:
    """Paired comparison of two methods' correctness on the same sequences."""

    first_only: int  # sequences the first method got right and the second wrong
    second_only: int  # the other way round
    p_value: float  # exact two-sided binomial test of first_only vs second_only

    @property
    def discordant(self) -> int:
        return self.first_only + self.second_only


def mcnemar_exact(first_right: Sequence[bool], second_right: Sequence[bool]) -> McNemar:
    """McNemar's exact test: under H0 a discordant pair favours either method with p = 1/2."""
    if len(first_right) != len(second_right):
        raise ConfigError(
            f"paired test needs equal lengths, got {len(first_right)} and {len(second_right)}"
        )
    b = sum(1 for f, s in zip(first_right, second_right, strict=True) if f and not s)
    c = sum(1 for f, s in zip(first_right, second_right, strict=True) if s and not f)
    n, k = b + c, min(b, c)
    if n == 0:
        return McNemar(b, c, 1.0)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)  # exact for any n
    return McNemar(b, c, float(min(Fraction(1), 2 * tail)))


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max over seeds."""
    if not values:
        raise ConfigError("no values to summarise")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip
