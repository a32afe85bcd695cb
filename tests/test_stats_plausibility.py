"""The plausibility rule: hand-computed bounds on the probe's median and robust spread, lies
refused with the numbers that decided it, and a few extreme probe tokens change nothing."""

from __future__ import annotations

import numpy as np
import pytest
from _signed_export import STATS_MODULES, make_stats

from seqr.core.admission_policy import AdmissionPolicy
from seqr.core.errors import AdmissionError, ValueCheckError
from seqr.core.stats import NormStatistics, RunningMoments
from seqr.core.stats_plausibility import MAD_TO_STD, check_stats_plausible, plausible_range

S = MAD_TO_STD  # the robust spread of _probe(): 1.4826 x MAD, with MAD = 1


def _probe(center: float = 5.0, mad: float = 1.0) -> dict[str, np.ndarray]:
    # Median `center`, median absolute deviation `mad` (8 of 9 values lie `mad` away).
    values = np.array([center - mad] * 4 + [center] + [center + mad] * 4)
    return {m: values for m in STATS_MODULES}


def _exact_stats(mean: float, std: float, count: int = 16) -> NormStatistics:
    moments = RunningMoments(1, count, np.array([mean]), np.array([std * std * count]))
    return NormStatistics({m: moments for m in STATS_MODULES})


def _default_bounds() -> dict[str, float]:
    defaults = AdmissionPolicy.__dataclass_fields__
    return {k: defaults[k].default for k in ("max_sigma_ratio", "max_mean_z", "max_mean_z_above")}


def _check(stats: NormStatistics, probe: dict[str, np.ndarray], **bounds: float) -> None:
    check_stats_plausible(stats, probe, **{"max_sigma_ratio": 3.0, "max_mean_z": 1.0, **bounds})


def test_median_and_robust_spread_hand_computed() -> None:
    allowed = plausible_range(
        _probe()[STATS_MODULES[0]], max_sigma_ratio=2.0, max_mean_z=1.0, max_mean_z_above=10.0
    )
    assert (allowed.center, allowed.spread, allowed.count) == (5.0, S, 9)
    assert allowed.min_mean == 5.0 - S and allowed.max_mean == 5.0 + 10 * S
    assert allowed.min_std == S / 2


def test_robust_spread_estimates_the_std_of_normal_data() -> None:
    values = np.random.default_rng(0).normal(3.0, 0.5, size=200_000)
    allowed = plausible_range(values, max_sigma_ratio=1.0, max_mean_z=0.0)
    assert allowed.center == pytest.approx(3.0, abs=0.01)
    assert allowed.spread == pytest.approx(0.5, rel=0.01)


def test_honest_stats_plausible() -> None:
    # Own-domain data: larger scores and a spread comparable to generic text.
    _check(make_stats(mean=6.0, std=0.8), _probe())


def test_bounds_are_inclusive_hand_computed() -> None:
    # Probe median 5, spread S. Claimed mean 5 - S is exactly 1 spread below; claimed std S/2
    # is exactly 2 times smaller: both at the bound, so allowed (z at the median = 2 = 1 * 2).
    _check(_exact_stats(5.0 - S, S / 2), _probe(), max_sigma_ratio=2.0)
    with pytest.raises(AdmissionError, match="1.02 probe spreads below the probe median 5"):
        _check(_exact_stats(5.0 - 1.02 * S, S / 2), _probe(), max_sigma_ratio=2.0)
    with pytest.raises(AdmissionError, match="2.04 times smaller than the probe spread"):
        _check(_exact_stats(5.0 - S, S / 2.04), _probe(), max_sigma_ratio=2.0)


def test_claimed_mean_far_above_probe_refused_with_its_own_message() -> None:
    bounds = {"max_sigma_ratio": 3.0, "max_mean_z": 2.0, "max_mean_z_above": 100.0}
    check_stats_plausible(_exact_stats(5.0 + 100 * S, 1.0), _probe(), **bounds)  # at the bound
    with pytest.raises(AdmissionError, match="100 probe spreads ABOVE the probe median 5") as info:
        check_stats_plausible(_exact_stats(5.0 + 100.1 * S, 1.0), _probe(), **bounds)
    assert info.value.reason == "implausible_stats"
    assert "no measurement of this adapter gives it" in str(info.value)
    # Without the bound the same claim passes (the rule's structure is otherwise unchanged).
    check_stats_plausible(_exact_stats(1e30, 1.0), _probe(), max_sigma_ratio=3, max_mean_z=2)


@pytest.mark.parametrize(
    ("mean", "std", "match", "bound"),
    [
        (5.0, 0.01, "148 times smaller", "max-sigma-ratio"),  # S / 0.01
        (2.5, 1.0, "1.69 probe spreads below", "max-mean-z"),  # (5 - 2.5) / S
    ],
    ids=["tiny_sigma", "small_mean"],
)
def test_lie_refused_naming_its_numbers_and_what_to_change(
    mean: float, std: float, match: str, bound: str
) -> None:
    with pytest.raises(AdmissionError, match=match) as info:
        _check(_exact_stats(mean, std), _probe())
    message = str(info.value)
    assert info.value.reason == "implausible_stats"
    assert "probe median 5 and spread 1.4826" in message and "on 9 public probe tokens" in message
    assert "If this adapter is honest" in message and f"raise {bound}" in message
    assert "probe-text" in message


def test_a_few_extreme_tokens_do_not_refuse_an_honest_adapter() -> None:
    # Issue 20's case: honest gains near 0.46 (spread 0.26) on 31 of every 32 probe tokens,
    # and one extreme token per chunk (the first token's massive activation, 186 there).
    rng = np.random.default_rng(1)
    values = rng.normal(0.46, 0.26, size=(32, 128))
    values[:, 0] = 186.0
    probe = {m: values.reshape(-1) for m in STATS_MODULES}
    honest = _exact_stats(0.47, 0.276)
    assert values.std() / 0.276 > 50  # the raw std: what refused it before ("70 times")
    _check(honest, probe, max_sigma_ratio=3.0, max_mean_z=2.0)
    with pytest.raises(AdmissionError, match="times smaller"):  # a narrow lie still is not
        _check(_exact_stats(0.47, 0.276 / 10), probe, max_sigma_ratio=3.0, max_mean_z=2.0)


def test_policy_defaults_drive_plausibility() -> None:
    bounds = _default_bounds()
    check_stats_plausible(make_stats(mean=5.0, std=0.6), _probe(), **bounds)
    with pytest.raises(AdmissionError):  # std S / 0.2 = 7.4 times smaller, over 3
        check_stats_plausible(make_stats(mean=5.0, std=0.2), _probe(), **bounds)


def test_default_bound_admits_the_honest_mean_seed_1_refused() -> None:
    # The ten-domain simulation's seed 1: an honest shakespeare adapter claimed a mean 2.82
    # probe spreads below the probe median on one module and was refused under the old bound 2.
    bounds = _default_bounds()
    check_stats_plausible(_exact_stats(5.0 - 2.82 * S, S), _probe(), **bounds)
    with pytest.raises(AdmissionError, match="4.1 probe spreads below"):
        check_stats_plausible(_exact_stats(5.0 - 4.1 * S, S), _probe(), **bounds)


@pytest.mark.parametrize(
    ("probe", "match"),
    [
        ({}, "no probe values"),
        ({m: np.array([5.0]) for m in STATS_MODULES}, "T >= 2"),
        ({m: np.full(8, 5.0) for m in STATS_MODULES}, "do not vary"),
        ({m: np.array([4.0, 5.0, 5.0, 5.0, 6.0]) for m in STATS_MODULES}, "do not vary"),
        ({m: np.array([1.0, np.nan]) for m in STATS_MODULES}, "NaN"),
    ],
    ids=["missing", "one_token", "constant", "mostly_constant", "nan"],
)
def test_unusable_probe_is_server_error(probe: dict, match: str) -> None:
    with pytest.raises(ValueCheckError, match=match):
        _check(make_stats(), probe)
