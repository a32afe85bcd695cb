"""Wilson intervals and McNemar's exact test against values computed by hand / published."""

import math

import pytest

from seqr.core.errors import ConfigError
from seqr.sim.significance import mcnemar_exact, mean_and_spread, wilson_interval


def test_wilson_interval_matches_the_published_example():
    # Newcombe (1998), Table I, example (i): 81 of 263 -> 0.2553 to 0.3662.
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_wilson_interval_stays_inside_zero_one_at_the_edges():
    assert wilson_interval(0, 10)[0] == 0.0 and 0.0 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == 1.0 and 0.65 < wilson_interval(10, 10)[0] < 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ConfigError, match="successes <= trials"):
        wilson_interval(5, 4)


def test_mcnemar_exact_counts_discordant_pairs_and_matches_the_binomial_tail():
    first = [True] * 10 + [True] * 6 + [False] * 1 + [False] * 3
    second = [True] * 10 + [False] * 6 + [True] * 1 + [False] * 3
    result = mcnemar_exact(first, second)
    assert (result.first_only, result.second_only, result.discordant) == (6, 1, 7)
    # two-sided: 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8 / 128
    assert result.p_value == pytest.approx(16 / 128)


def test_mcnemar_is_one_without_discordant_pairs_and_exact_for_large_n():
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    big = mcnemar_exact([True] * 1500 + [False] * 1500, [False] * 1500 + [True] * 1500)
    assert big.p_value == 1.0  # 1500 vs 1500: no evidence either way, no float overflow
    lopsided = mcnemar_exact([True] * 1200, [False] * 1200)
    assert 0.0 <= lopsided.p_value < 1e-300 or lopsided.p_value == 0.0


def test_mean_and_spread_over_seeds():
    out = mean_and_spread([0.9, 0.95, 1.0])
    assert out["mean"] == pytest.approx(0.95) and out["std"] == pytest.approx(0.05)
    assert (out["min"], out["max"], out["n"]) == (0.9, 1.0, 3)
    assert mean_and_spread([0.5])["std"] == 0.0
    assert math.isfinite(mean_and_spread([1e9, -1e9])["std"])
