"""Streaming, mergeable calibration statistics: exact against numpy over the pooled data."""

import numpy as np
import pytest
import torch

from seqr.core.errors import FormatError, ShapeError, ValueCheckError
from seqr.core.stats import NormStatistics, RunningMoments


def batches(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.5, size=(int(rng.integers(1, 50)), n)) for _ in range(20)]


def test_streaming_moments_equal_numpy_over_all_values():
    data = batches()
    moments = RunningMoments(3)
    for batch in data:
        moments.update(torch.from_numpy(batch))
    pooled = np.concatenate(data)
    assert moments.count == len(pooled)
    np.testing.assert_allclose(moments.mean, pooled.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.std, pooled.std(0), rtol=1e-12)


def test_merging_partial_results_from_workers_is_exact():
    data = batches(seed=1)
    workers = [RunningMoments(3) for _ in range(4)]
    for i, batch in enumerate(data):
        workers[i % 4].update(batch)
    merged = workers[0].merge(workers[1]).merge(workers[2].merge(workers[3]))
    pooled = np.concatenate(data)
    assert merged.count == len(pooled)
    np.testing.assert_allclose(merged.mean, pooled.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.std, pooled.std(0), rtol=1e-12)


def test_memory_is_constant_in_the_number_of_batches():
    moments = RunningMoments(2)
    for batch in batches(n=2):
        moments.update(batch)
    assert moments.mean.shape == moments.m2.shape == (2,)


def test_module_statistics_pool_over_modules():
    stats = NormStatistics()
    data = {f"layers.{i}.q_proj": batches(seed=i, n=1) for i in range(3)}
    for name, chunks in data.items():
        for chunk in chunks:
            stats.update(name, chunk[:, 0])
    everything = np.concatenate([np.concatenate(c) for c in data.values()])[:, 0]
    pooled = stats.pooled()
    np.testing.assert_allclose(pooled.mean, [everything.mean()], rtol=1e-12)
    np.testing.assert_allclose(pooled.std, [everything.std()], rtol=1e-12)
    one = np.concatenate(data["layers.1.q_proj"])[:, 0]
    np.testing.assert_allclose(stats.modules["layers.1.q_proj"].mean, [one.mean()], rtol=1e-12)


def test_statistics_round_trip_through_json_bytes():
    stats = NormStatistics()
    for batch in batches():
        stats.update("m", batch)
    again = NormStatistics.from_json_bytes(stats.to_json_bytes())
    assert again.to_json_bytes() == stats.to_json_bytes()
    np.testing.assert_array_equal(again.modules["m"].mean, stats.modules["m"].mean)


def test_merged_statistics_keep_modules_of_both_sides():
    left, right = NormStatistics(), NormStatistics()
    left.update("a", [1.0, 2.0])
    right.update("a", [3.0]).update("b", [4.0, 6.0])
    merged = left.merge(right)
    assert merged.modules["a"].count == 3 and merged.modules["b"].count == 2
    np.testing.assert_allclose(merged.modules["a"].mean, [2.0])
    assert left.modules["a"].count == 2  # inputs are not modified


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"format_version": 1, "modules": {}}',
        b'{"format_version": 2, "modules": {"m": {"count": 1, "mean": [1.0], "m2": [0.0]}}}',
        b'{"format_version": 1, "modules": {"m": {"count": -1, "mean": [1.0], "m2": [0.0]}}}',
        b'{"format_version": 1, "modules": {"m": {"count": 1, "mean": [NaN], "m2": [0.0]}}}',
        b'{"format_version": 1, "modules": {"m": {"count": 1, "mean": [1.0], "m2": [-1.0]}}}',
        b'{"format_version": 1, "modules": {"m": {"count": 1, "mean": [1.0]}}}',
        b'{"format_version": 1, "modules": {"m": {"count": 1, "mean": [1.0], "m2": [0.0]}},'
        b' "extra": 1}',
    ],
)
def test_malformed_statistics_are_rejected(payload):
    with pytest.raises(FormatError):
        NormStatistics.from_json_bytes(payload)


def test_bad_values_are_rejected_before_they_enter_the_statistics():
    moments = RunningMoments(2)
    with pytest.raises(ShapeError):
        moments.update(np.ones((4, 3)))
    with pytest.raises(ValueCheckError):
        moments.update(np.array([[1.0, float("inf")]]))
    assert moments.count == 0
    with pytest.raises(ValueCheckError, match="no values"):
        _ = moments.std


def test_privacy_record_travels_with_the_statistics_and_is_checked():
    stats = NormStatistics(
        privacy={"mechanism": "analytic-gaussian", "epsilon": 1.0, "delta": 1e-5}
    )
    stats.update("m", [1.0, 2.0])
    again = NormStatistics.from_json_bytes(stats.to_json_bytes())
    assert again.privacy == {"mechanism": "analytic-gaussian", "epsilon": 1.0, "delta": 1e-5}
    assert (
        NormStatistics.from_json_bytes(NormStatistics().update("m", [1.0]).to_json_bytes()).privacy
        is None
    )
    bad = stats.to_dict()
    bad["privacy"]["epsilon"] = -1
    with pytest.raises(FormatError, match="epsilon"):
        NormStatistics.from_dict(bad)


def test_the_measured_score_travels_with_the_statistics_and_must_match_to_merge():
    gains = NormStatistics(score="gain").update("m", [0.5, 0.7])
    back = NormStatistics.from_json_bytes(gains.to_json_bytes())
    assert back.score == "gain"
    legacy = b'{"format_version": 1, "modules": {"m": {"count": 2, "mean": [1.0], "m2": [0.5]}}}'
    assert NormStatistics.from_json_bytes(legacy).score == "norm"  # files before the field
    with pytest.raises(FormatError, match="cannot merge"):
        gains.merge(NormStatistics().update("m", [1.0, 2.0]))
    with pytest.raises(FormatError, match="score"):
        NormStatistics.from_json_bytes(legacy.replace(b"}}}", b'}}, "score": "energy"}'))
