"""Numbers another party sends are bounded in the dtype routers compute in (float32): huge
weights, huge or degenerate statistics and a mean far above the probe are refused at
admission, each with its reason, and the replay state is unchanged afterwards."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _signed_export import (
    A_SEED,
    A_SHA,
    BASE_SHA,
    CREATED,
    RANK,
    STATS_MODULES,
    TARGETS,
    expected_tensors,
    make_export,
    make_key,
    make_stats,
    make_tensors,
    tensor_name,
)

from seqr.core.admission import REASONS, AdmissionPolicy, SeenSubmissions, admit
from seqr.core.errors import AdmissionError, ConfigError, ValueCheckError
from seqr.core.manifest import read_export
from seqr.core.stats import NormStatistics, RunningMoments
from seqr.core.value_bounds import (
    StatsBounds,
    WeightBounds,
    check_statistics,
    check_weights,
    float32_usable,
)
from seqr.operator.settings import POLICY_BOUNDS, ServerSettings

NOW = CREATED.replace(minute=CREATED.minute + 1)


@pytest.fixture
def key(tmp_path: Path) -> Any:
    return make_key(tmp_path / "client-key")


def _policy(key: Any, **bounds: Any) -> AdmissionPolicy:
    return AdmissionPolicy(
        base_model_sha256=BASE_SHA, a_seed=A_SEED, a_sha256=A_SHA, rank=RANK,
        target_modules=TARGETS, expected_tensors=expected_tensors(),
        stats_modules=STATS_MODULES, stats_score="norm",
        allowed_keys=frozenset({key.public.hex()}), **bounds,
    )  # fmt: skip


def _submit(tmp_path: Path, key: Any, **export: Any) -> dict[str, bytes]:
    make_export(tmp_path / "x", key, **export)
    return read_export(tmp_path / "x")


def _refused(files: dict[str, bytes], policy: AdmissionPolicy, reason: str, match: str) -> None:
    seen = SeenSubmissions()
    before = copy.deepcopy(seen)
    with pytest.raises(AdmissionError, match=match) as info:
        admit(files, policy, seen=seen, now=NOW)
    assert info.value.reason == reason and reason in REASONS
    assert seen == before


def _exact_stats(mean: float, std: float, count: int = 64) -> NormStatistics:
    return NormStatistics(
        {m: RunningMoments(1, count, np.array([mean]), np.array([std * std * count]))
         for m in STATS_MODULES}
    )  # fmt: skip


# --- weights --------------------------------------------------------------------------------


def test_huge_b_finite_in_float32_refused_at_admission(tmp_path: Path, key: Any) -> None:
    tensors = make_tensors()
    tensors[tensor_name("v_proj", "B")] *= np.float32(1e20)  # finite; B^T B is not
    assert np.isfinite(tensors[tensor_name("v_proj", "B")]).all()
    files = _submit(tmp_path, key, tensors=tensors)
    _refused(files, _policy(key), "weights_out_of_bounds", "v_proj.lora_B.weight.*Frobenius")


def test_weight_bound_is_inclusive_hand_computed(tmp_path: Path, key: Any) -> None:
    tensors = make_tensors()
    b = np.zeros_like(tensors[tensor_name("q_proj", "B")])
    b[0, 0], b[1, 1] = 3.0, 4.0  # Frobenius norm exactly 5
    tensors[tensor_name("q_proj", "B")] = b
    files = _submit(tmp_path, key, tensors=tensors)
    admit(files, _policy(key, max_tensor_norm=5.0), seen=SeenSubmissions(), now=NOW)
    _refused(files, _policy(key, max_tensor_norm=4.99), "weights_out_of_bounds", "norm 5")


def test_check_weights_names_the_tensor_and_never_overflows() -> None:
    near_max = {"t": np.full((64, 64), 3e38, dtype=np.float32)}  # squares overflow float32
    with pytest.raises(ValueCheckError, match="'t' has Frobenius norm 1.92e\\+40"):
        check_weights(near_max, WeightBounds())
    check_weights(make_tensors(), WeightBounds())  # honest: far inside


# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        (1e39, 1.0, "mean 1e\\+39 is outside"),  # finite in float64, inf in float32
        (2e6, 1.0, "mean 2e\\+06 is outside the allowed range \\(0, 1e\\+06\\]"),
        (5.0, 1e-20, "std 1e-20 is outside the allowed range \\[1e-12, 1e\\+06\\]"),
        (5.0, 1e7, "std 1e\\+07 is outside"),
    ],
    ids=["mean_inf_in_float32", "mean_over_bound", "std_under_floor", "std_over_bound"],
)
def test_huge_or_tiny_claimed_statistics_refused_at_admission(
    tmp_path: Path, key: Any, mean: float, std: float, match: str
) -> None:
    files = _submit(tmp_path, key, stats=_exact_stats(mean, std).to_json_bytes())
    _refused(files, _policy(key), "bad_stats", match)


@pytest.mark.parametrize(
    ("moments", "match"),
    [
        (RunningMoments(1, 0, np.array([5.0]), np.array([0.0])), "from 0 values, fewer than 1"),
        (RunningMoments(1, 10, np.array([5.0]), np.array([0.0])), "std 0 is outside"),
        (RunningMoments(1, 2**60, np.array([5.0]), np.array([1.0])), "more than 2\\*\\*53"),
        (RunningMoments(1, 10, np.array([1e39]), np.array([10.0])), "mean 1e\\+39"),
        (RunningMoments(1, 10, np.array([-1.0]), np.array([10.0])), "mean -1 is outside"),
    ],
    ids=["count_0", "std_0", "count_over_2_53", "mean_inf_in_float32", "negative_mean"],
)
def test_server_listed_degenerate_statistics_refused_by_the_audit_check(
    moments: RunningMoments, match: str
) -> None:
    # The pure check the registry's audit runs on every listed norm_stats.json.
    stats = NormStatistics({STATS_MODULES[0]: moments})
    before = stats.to_json_bytes() if moments.count else None
    with pytest.raises(ValueCheckError, match=match):
        check_statistics(stats, StatsBounds())
    if before is not None:
        assert stats.to_json_bytes() == before  # pure: the statistics are not changed


def test_float32_usability_is_checked_in_float32_itself() -> None:
    assert float32_usable(1e6, 1e-12)
    assert not float32_usable(1e39, 1.0)  # mean overflows
    assert not float32_usable(1.0, 1e-46)  # std rounds to 0
    assert not float32_usable(1.0, 1e-39)  # subnormal std: 1/std overflows
    # The loosest bounds a config may set still keep every accepted value usable in float32.
    with pytest.raises(ConfigError, match="min_std"):
        StatsBounds(min_std=1e-39)
    check_statistics(_exact_stats(1e30, 1e-30), StatsBounds(max_mean=1e30, min_std=1e-30))


def test_honest_statistics_pass_the_bounds() -> None:
    check_statistics(make_stats(), StatsBounds())


# --- configuration: each default written once ------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"max_tensor_norm": float("inf")}, "max_tensor_norm"),
        ({"max_tensor_norm": 1e20}, "max_tensor_norm"),
        ({"max_stats_mean": -1.0}, "max_mean"),
        ({"min_stats_std": 0.0}, "min_std"),
        ({"min_stats_std": 10.0, "max_stats_std": 1.0}, "min_std"),
        ({"min_stats_count": 0}, "min_count"),
        ({"max_mean_z_above": math.nan}, "max_mean_z_above"),
    ],
)
def test_invalid_bounds_refused_naming_the_field(key: Any, changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _policy(key, **changes)


def test_server_settings_carry_every_policy_bound_with_the_policys_default(key: Any) -> None:
    settings = ServerSettings(registry_dir="r", server_keys="k")
    bounds = settings.policy_bounds()
    assert set(bounds) == set(POLICY_BOUNDS)
    assert bounds == {name: getattr(AdmissionPolicy, name) for name in POLICY_BOUNDS}
    policy = _policy(key, **bounds)  # what RoundRunner builds: setup.policy(**bounds)
    assert policy.stats_bounds == StatsBounds() and policy.weight_bounds == WeightBounds()
    tight = ServerSettings(registry_dir="r", server_keys="k", max_tensor_norm=2.0)
    assert _policy(key, **tight.policy_bounds()).weight_bounds.max_tensor_norm == 2.0
    with pytest.raises(ConfigError, match="max_tensor_norm"):
        ServerSettings(registry_dir="r", server_keys="k", max_tensor_norm=1e20)
