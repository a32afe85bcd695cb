"""Streaming, mergeable statistics of activation norms (SEQR calibration).

SEQR routes by z-scores (||R_i A x|| - mu_i) / sigma_i, with mu_i and sigma_i measured offline on
adapter i's own data (arXiv 2509.18093, Sec. 3). Clients compute them in one pass over any iterator
of batches (constant memory: count, mean and M2 per series, Welford) and partial results from
several workers combine exactly with the parallel formula of Chan, Golub and LeVeque (1979).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, get_args

import numpy as np

from seqr.core.errors import FormatError, ShapeError, ValueCheckError
from seqr.core.strict_json import loads_strict

STATS_FORMAT_VERSION = 1
ScoreKind = Literal["norm", "gain"]  # what is measured: seqr.core.routing.gain
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)
MAX_STATS_BYTES = 16 * 1024 * 1024  # bytes; a statistics file is a few KB per adapter


def _as_2d_float64(values: Any, n: int | None = None) -> np.ndarray:
    """(T, n) float64 array from torch or numpy; (T,) counts as one series."""
    if hasattr(values, "detach"):  # a torch.Tensor, without importing torch here
        values = values.detach().to("cpu").double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    n = array.shape[1] if n is None and array.ndim == 2 else n
    if array.ndim != 2 or array.shape[1] != n:
        raise ShapeError(f"norm values must have shape (T, {n}), got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueCheckError("norm values contain NaN or inf; check the adapter weights")
    return array


@dataclass
class RunningMoments:
    """Count, mean and M2 (sum of squared deviations) of ``n`` parallel series."""

    n: int
    count: int = 0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ShapeError(f"RunningMoments needs n >= 1 series, got n = {self.n}")
        if self.count < 0:
            raise ValueCheckError(f"count must be >= 0, got {self.count}")
        self.mean = np.zeros(self.n) if self.mean.size == 0 else np.asarray(self.mean, np.float64)
        self.m2 = np.zeros(self.n) if self.m2.size == 0 else np.asarray(self.m2, np.float64)
        if self.mean.shape != (self.n,) or self.m2.shape != (self.n,):
            raise ShapeError(
                f"mean and m2 must have shape ({self.n},), got {self.mean.shape}, {self.m2.shape}"
            )

    def update(self, values: Any) -> RunningMoments:
        """Add a batch of shape (T, n) (or (T,) when n == 1). Returns self."""
        batch = _as_2d_float64(values, self.n)
        if batch.shape[0] == 0:
            return self
        other = RunningMoments(
            self.n,
            count=batch.shape[0],
            mean=batch.mean(axis=0),
            m2=((batch - batch.mean(axis=0)) ** 2).sum(axis=0),
        )
        merged = self.merge(other)
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Exact combination of two partial results (Chan et al. 1979, eq. 2.1)."""
        if other.n != self.n:
            raise ShapeError(f"cannot merge moments of {self.n} and {other.n} series")
        if other.count == 0:
            return RunningMoments(self.n, self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return RunningMoments(other.n, other.count, other.mean.copy(), other.m2.copy())
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        return RunningMoments(self.n, total, mean, m2)

    @property
    def variance(self) -> np.ndarray:
        """Population variance (M2 / count)."""
        if self.count == 0:
            raise ValueCheckError("no values were seen yet; run calibration on some data first")
        return np.asarray(self.m2 / self.count)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(np.sqrt(self.variance))

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": int(self.count),
            "mean": [float(v) for v in self.mean],
            "m2": [float(v) for v in self.m2],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunningMoments:
        if not isinstance(data, Mapping) or set(data) != {"count", "mean", "m2"}:
            raise FormatError("moments must be an object with exactly count, mean and m2")
        count, mean, m2 = data["count"], data["mean"], data["m2"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise FormatError(f"count must be a non-negative integer, got {count!r}")
        for key, seq in (("mean", mean), ("m2", m2)):
            if not isinstance(seq, list) or not seq:
                raise FormatError(f"{key} must be a non-empty list of numbers")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq):
                raise FormatError(f"{key} must hold only numbers")
            if not all(math.isfinite(v) for v in seq):
                raise FormatError(f"{key} holds NaN or inf")
        if len(mean) != len(m2):
            raise FormatError(f"mean has {len(mean)} entries but m2 has {len(m2)}")
        if any(v < 0 for v in m2):
            raise FormatError("m2 (sum of squared deviations) cannot be negative")
        return cls(len(mean), count, np.array(mean, np.float64), np.array(m2, np.float64))


@dataclass
class NormStatistics:
    """Per-module moments of activation norms, and the same pooled over modules.

    ``privacy`` records the differential-privacy guarantee of noised statistics (mechanism,
    epsilon, delta, clip, ...): it travels inside the signed statistics file. ``score`` says
    what was measured: ``"norm"`` (||B A x||) or ``"gain"`` (||B A x|| / ||A x||,
    seqr.core.routing.gain); a router z-scores the same kind.
    """

    modules: dict[str, RunningMoments] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    score: ScoreKind = "norm"

    def __post_init__(self) -> None:
        if self.score not in SCORE_KINDS:
            raise FormatError(f"statistics score {self.score!r} must be one of {SCORE_KINDS}")

    def update(self, module: str, values: Any) -> NormStatistics:
        batch = _as_2d_float64(values)
        moments = self.modules.setdefault(module, RunningMoments(batch.shape[1]))
        moments.update(batch)
        return self

    def update_many(self, batches: Iterable[tuple[str, Any]]) -> NormStatistics:
        for module, values in batches:
            self.update(module, values)
        return self

    def merge(self, other: NormStatistics) -> NormStatistics:
        if other.modules and self.modules and other.score != self.score:
            raise FormatError(f"cannot merge {self.score} statistics with {other.score} ones")
        score = self.score if self.modules else other.score
        merged = {
            name: RunningMoments(m.n, m.count, m.mean, m.m2) for name, m in self.modules.items()
        }
        for name, moments in other.modules.items():
            merged[name] = merged[name].merge(moments) if name in merged else moments
        return NormStatistics(merged, score=score)

    def pooled(self) -> RunningMoments:
        if not self.modules:
            raise ValueCheckError("no module statistics to pool; calibrate first")
        moments = list(self.modules.values())
        total = moments[0]
        for m in moments[1:]:
            total = total.merge(m)
        return total

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": STATS_FORMAT_VERSION,
            "modules": {name: self.modules[name].to_dict() for name in sorted(self.modules)},
            "score": self.score,
        }
        if self.privacy is not None:
            out["privacy"] = self.privacy
        return out

    @classmethod
    def from_dict(cls, data: Any) -> NormStatistics:
        keys = set(data) if isinstance(data, Mapping) else set()
        if (
            not {"format_version", "modules"}
            <= keys
            <= {
                "format_version",
                "modules",
                "privacy",
                "score",
            }
        ):
            raise FormatError(
                "statistics must be an object with format_version, modules and optionally "
                "privacy and score"
            )
        if data["format_version"] != STATS_FORMAT_VERSION:
            raise FormatError(
                f"statistics format_version {data['format_version']!r} is not "
                f"{STATS_FORMAT_VERSION}; upgrade seqr"
            )
        if not isinstance(data["modules"], Mapping) or not data["modules"]:
            raise FormatError("statistics hold no modules")
        modules = {}
        for name, moments in data["modules"].items():
            try:
                modules[str(name)] = RunningMoments.from_dict(moments)
            except FormatError as exc:
                raise FormatError(f"statistics of module {name!r}: {exc}") from None
        privacy = _check_privacy(data["privacy"]) if "privacy" in data else None
        return cls(modules, privacy, data.get("score", "norm"))  # files before "score": norms

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> NormStatistics:
        # Received from another party (a client, a registry): the one strict parser.
        parsed = loads_strict(data, what="statistics", max_bytes=MAX_STATS_BYTES)
        return cls.from_dict(parsed)


def _check_privacy(privacy: Any) -> dict[str, Any]:
    """A DP record must state its mechanism and (epsilon, delta) in range; the rest is free."""
    if not isinstance(privacy, Mapping):
        raise FormatError("privacy must be an object (mechanism, epsilon, delta, clip, ...)")
    mechanism, eps, delta = privacy.get("mechanism"), privacy.get("epsilon"), privacy.get("delta")
    if not isinstance(mechanism, str) or not mechanism:
        raise FormatError("privacy.mechanism must name the mechanism")
    if not (_is_number(eps) and eps > 0):
        raise FormatError(f"privacy.epsilon = {eps!r} is out of range")
    if not (_is_number(delta) and 0 <= delta < 1):
        raise FormatError(f"privacy.delta = {delta!r} is out of range")
    return dict(privacy)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
