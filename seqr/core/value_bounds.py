"""Bounds on the numbers another party sends: adapter weights and norm statistics.

Why: a value that is finite where it is checked can overflow where it is used. Routers compute
in float32 (seqr.core.routing.base.compute_dtype_for): SEQR forms B^T B, brute force ||B A x||,
and a z-score divides by std. B entries near 1e20 are finite in float32, but B^T B is not; a
mean of 1e39 is finite in float64 but infinite in float32 (docs/THREATS.md, "Numeric overflow
across a dtype boundary"). So admission, the registry's audit and group averaging bound what
they accept, relative to what honest adapters produce and far inside float32's range, and
check each value in float32 itself.

Where the defaults come from (seqr's own adapters, every tensor and module measured):

- weights: the 10 real SmolLM2-135M adapters of the baseline simulation (50 steps, lr 2e-3,
  rank 8, all linear modules; /work/baseline/runs/simulation-20261203-142824) have
  ||B||_F <= 2.80 per tensor and |B| <= 0.088; tiny-model test adapters ||B||_F <= 0.15.
  AdamW moves an entry by at most about lr per step, so the default federation (100 steps,
  d_out <= 1536, r = 8) stays below 0.2 * sqrt(1536 * 8) = 22. The shared A has
  ||A||_F = sqrt(r / 3) (uniform entries of bound 1/sqrt(d_in)), 1.6 for r = 8. The default
  bound 1e4 is 3500 times the measured maximum and 450 times that worst case, and keeps B^T B
  (<= 1e8) and every squared score finite in float32 by more than 20 orders of magnitude.
- statistics: the same real adapters claim gain means 0.21-1.90 and stds 0.014-0.33 (tiny
  ones: means 0.02-0.06, stds 0.001-0.011); gains are at most ||B||_2 <= ||B||_F. Their norms
  ||B A x|| on the probe text reach 228 per token (module means <= 5.3). The cap of 1e6 on
  mean and std leaves a margin of 4000 over the largest honest token norm, for both kinds.
  The floor on std (1e-12) keeps 1/std and every z-score finite in float32: |z| <= 1e6 /
  1e-12 = 1e18, and a sequence's sum over 1e7 (token, module) pairs stays below 1e25 << 3.4e38.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from seqr.core.errors import ConfigError, ValueCheckError
from seqr.core.stats import NormStatistics

__all__ = [
    "FLOAT32_SAFE",
    "MAX_STATS_COUNT",
    "StatsBounds",
    "WeightBounds",
    "check_statistics",
    "check_weights",
    "float32_usable",
]

FLOAT32_SAFE = 1e30  # largest bound a config may set: its square must not reach float32's 3.4e38
MAX_STATS_COUNT = 2**53  # values behind one module's statistics; exact in float64


@dataclass(frozen=True)
class WeightBounds:
    """What any one adapter tensor may hold (A and B alike), in the tensor's own units."""

    max_tensor_norm: float = 1e4  # Frobenius norm of one tensor (one module's B or A)

    def __post_init__(self) -> None:
        _positive_bound(self, "max_tensor_norm", low=0.0, high=math.sqrt(FLOAT32_SAFE))


@dataclass(frozen=True)
class StatsBounds:
    """What one adapter's per-module statistics may claim, in units of the score (gain or
    norm) they measure."""

    min_count: int = 1  # norm values (tokens) behind each module's statistics
    max_mean: float = 1e6  # claimed mean score
    min_std: float = 1e-12  # claimed std: the floor keeps 1/std finite in float32
    max_std: float = 1e6  # claimed std

    def __post_init__(self) -> None:
        count = self.min_count
        if isinstance(count, bool) or not isinstance(count, int):
            _bad(self, "min_count", count, "must be an integer")
        if not 1 <= count <= MAX_STATS_COUNT:
            _bad(self, "min_count", count, "must be in [1, 2**53]")
        _positive_bound(self, "max_mean", low=0.0, high=FLOAT32_SAFE)
        _positive_bound(self, "min_std", low=1 / FLOAT32_SAFE, high=FLOAT32_SAFE)
        _positive_bound(self, "max_std", low=0.0, high=FLOAT32_SAFE)
        if self.min_std > self.max_std:
            _bad(self, "min_std", self.min_std, f"must be <= max_std {self.max_std:g}")


def check_weights(tensors: Mapping[str, Any], bounds: WeightBounds) -> None:
    """ValueCheckError naming the first tensor that is not finite or whose Frobenius norm
    exceeds ``bounds.max_tensor_norm`` (computed in float64, so the check cannot overflow).

    Pure: numpy arrays (or anything np.asarray takes) by tensor name; nothing is changed.
    """
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if not np.isfinite(array).all():
            raise ValueCheckError(f"tensor {_name(name)} holds NaN or inf")
        norm = float(np.linalg.norm(array.astype(np.float64, copy=False).ravel()))
        if norm > bounds.max_tensor_norm:
            raise ValueCheckError(
                f"tensor {_name(name)} has Frobenius norm {norm:.4g}, over the bound of "
                f"{bounds.max_tensor_norm:g} (honest adapters stay below 25; routers compute "
                "in float32, where B^T B would overflow)"
            )


def check_statistics(stats: NormStatistics, bounds: StatsBounds) -> None:
    """ValueCheckError naming the first module whose statistics cannot be used or are out of
    bounds: count in [min_count, 2**53]; mean finite, > 0 and <= max_mean; std in
    [min_std, max_std]; and mean, std and 1/std finite in float32, the dtype routers use.

    Pure (no I/O, nothing changed): admission calls it on every submission, and the registry's
    audit on every listed adapter's norm_stats.json, with the same bounds.
    """
    if not stats.modules:
        raise ValueCheckError("statistics hold no modules")
    for module, moments in sorted(stats.modules.items()):
        where = f"module {_name(module)}"
        if moments.count < bounds.min_count:
            raise ValueCheckError(
                f"{where} statistics come from {moments.count} values, fewer than "
                f"{bounds.min_count}"
            )
        if moments.count > MAX_STATS_COUNT:
            raise ValueCheckError(
                f"{where} statistics claim {moments.count} values, more than 2**53"
            )
        mean = np.asarray(moments.mean, dtype=np.float64)
        std = np.sqrt(np.asarray(moments.m2, dtype=np.float64) / moments.count)
        for i in range(moments.n):
            _check_value(where, i, "mean", float(mean[i]), 0.0, bounds.max_mean, open_low=True)
            _check_value(where, i, "std", float(std[i]), bounds.min_std, bounds.max_std)
            if not float32_usable(float(mean[i]), float(std[i])):
                raise ValueCheckError(
                    f"{where}: mean {mean[i]:.4g} / std {std[i]:.4g} are not usable in float32 "
                    "(mean, std or 1/std overflows)"
                )


def float32_usable(mean: float, std: float) -> bool:
    """mean, std and 1/std all finite in float32 and std > 0 there (what a z-score needs)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        m, s = np.float32(mean), np.float32(std)
        return bool(np.isfinite(m) and np.isfinite(s) and s > 0 and np.isfinite(np.float32(1) / s))


def _check_value(
    where: str, i: int, what: str, value: float, low: float, high: float, *, open_low: bool = False
) -> None:
    series = f"[{i}]" if i else ""
    if not math.isfinite(value):
        raise ValueCheckError(f"{where}: {what}{series} is {value}; it must be finite")
    too_low = value <= low if open_low else value < low
    if too_low or value > high:
        interval = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise ValueCheckError(
            f"{where}: {what}{series} {value:.6g} is outside the allowed range {interval}"
        )


def _positive_bound(config: object, key: str, *, low: float, high: float) -> None:
    value = getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        _bad(config, key, value, "must be a number")
    if not (math.isfinite(value) and low < value <= high):
        _bad(config, key, value, f"must be in ({low:g}, {high:g}]")
    object.__setattr__(config, key, float(value))


def _bad(config: object, key: str, value: object, why: str) -> None:
    raise ConfigError(f"{type(config).__name__}.{key} = {value!r:.40} {why}")


def _name(text: str) -> str:
    return ascii(text[:96])
