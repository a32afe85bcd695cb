"""Bounding what an adapter may claim about its own scores (routing hijack, docs/THREATS.md).

SEQR routes by z = (s - mu) / sigma with mu, sigma measured by the adapter's owner on private
data (arXiv 2509.18093), so the server cannot check them against that data. But A is shared and
B is published: anyone can recompute the adapter's scores s on public probe text (with the one
measurement, seqr.core.measurement), and an adapter's honest statistics cannot be wildly
narrower or lower than those.

Robust to a few extreme tokens: the probe values are summarised by their median and their
median absolute deviation (MAD) times 1.4826, which estimates the standard deviation of normal
data (Hampel, JASA 69:383, 1974; Rousseeuw & Croux, JASA 88:1273, 1993); a claimed mean is then
judged as the median/MAD outlier rule judges a value (Iglewicz & Hoaglin, "How to Detect and
Handle Outliers", 1993; Leys et al., J. Exp. Soc. Psychol. 49:764, 2013). Both have a 50%
breakdown point: half the probe tokens would have to be extreme to move them. The raw std did
not have that: measured on SmolLM2-135M, the first token of every 128-token probe chunk alone
made the norm std of layer 11's down_proj 16.4 instead of 0.088 (seqr.core.measurement now
leaves that token out; the robust spread guards against the next such token).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from seqr.core.errors import AdmissionError, ValueCheckError
from seqr.core.stats import NormStatistics

__all__ = ["MAD_TO_STD", "PlausibleRange", "check_stats_plausible", "plausible_range"]

MAD_TO_STD = 1.482602218505602  # 1 / Phi^-1(3/4): MAD x this estimates sigma of normal data


@dataclass(frozen=True)
class PlausibleRange:
    """What one module's claimed (mean, std) may be, given the adapter's probe values."""

    center: float  # median of the probe values
    spread: float  # MAD_TO_STD x median absolute deviation: a robust std
    count: int  # probe values (measured tokens)
    min_mean: float  # center - max_mean_z * spread
    max_mean: float  # center + max_mean_z_above * spread (inf: no upper bound)
    min_std: float  # spread / max_sigma_ratio


def plausible_range(
    values: np.ndarray,
    *,
    max_sigma_ratio: float,
    max_mean_z: float,
    max_mean_z_above: float | None = None,
) -> PlausibleRange:
    """The range check_stats_plausible allows for probe values (T,); ValueCheckError when
    they cannot measure anything (T < 2, NaN or inf, no spread)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] < 2:
        raise ValueCheckError(f"probe values have shape {v.shape}; need (T >= 2,)")
    if not np.isfinite(v).all():
        raise ValueCheckError("probe values contain NaN or inf")
    center = float(np.median(v))
    spread = MAD_TO_STD * float(np.median(np.abs(v - center)))
    if not spread > 0:
        raise ValueCheckError(
            "probe values do not vary (median absolute deviation 0); use varied probe text"
        )
    above = np.inf if max_mean_z_above is None else center + max_mean_z_above * spread
    return PlausibleRange(
        center=center,
        spread=spread,
        count=int(v.shape[0]),
        min_mean=center - max_mean_z * spread,
        max_mean=float(above),
        min_std=spread / max_sigma_ratio,
    )


def check_stats_plausible(
    claimed: NormStatistics,
    probe_values: Mapping[str, np.ndarray],
    *,
    max_sigma_ratio: float,
    max_mean_z: float,
    max_mean_z_above: float | None = None,
) -> None:
    """Refuse statistics that would let an adapter win inputs that are not its own.

    SEQR routes by z = (s - mu) / sigma. A liar claims a small mu and a tiny sigma, so every
    input gets a large z (routing hijack). ``probe_values[module]`` holds the adapter's own
    scores s (norms or gains, the kind ``claimed`` measures), recomputed by the server at the
    measured probe tokens, shape (T,) or (T, n); with c_p their median and s_p their robust
    spread (module docstring), per module and series:

      1. mean:   mu >= c_p - max_mean_z * s_p  (the claimed mean may not sit more than
                 max_mean_z probe spreads BELOW the probe median; claiming more only hurts
                 the liar, and an honest adapter's own data usually gives it larger scores);
      2. spread: sigma >= s_p / max_sigma_ratio  (an honest adapter's scores on its own data
                 vary at least comparably to its scores on generic text);
      3. mean from above (when ``max_mean_z_above`` is given):
                 mu <= c_p + max_mean_z_above * s_p. A mean far above anything the adapter
                 produces is no hijack (it only lowers its own z-scores), but it is not a
                 measurement either, and a huge one breaks every router (1e39 is infinite in
                 float32); its own message says so.

    Together they bound the z-score at the probe median to (c_p - mu) / sigma <=
    max_mean_z * max_sigma_ratio. Raises AdmissionError("implausible_stats", ...) naming the
    numbers that decided it and what to change if the adapter is honest; probe values that
    cannot measure anything (missing module, T < 2, no spread) are a ValueCheckError, the
    server's fault and not the client's.
    """
    bounds = {
        "max_sigma_ratio": max_sigma_ratio,
        "max_mean_z": max_mean_z,
        "max_mean_z_above": max_mean_z_above,
    }
    for module, moments in sorted(claimed.modules.items()):
        if module not in probe_values:
            raise ValueCheckError(f"no probe values for module {module!r}; probe every module")
        probe = np.asarray(probe_values[module], dtype=np.float64)
        probe = probe[:, None] if probe.ndim == 1 else probe
        if probe.ndim != 2 or probe.shape[1] != moments.n:
            raise ValueCheckError(
                f"probe values of {module!r} have shape {probe.shape}; need (T, {moments.n})"
            )
        for i in range(moments.n):
            try:
                allowed = plausible_range(
                    probe[:, i],
                    max_sigma_ratio=max_sigma_ratio,
                    max_mean_z=max_mean_z,
                    max_mean_z_above=max_mean_z_above,
                )
            except ValueCheckError as exc:
                raise ValueCheckError(f"module {module!r}: {exc}") from None
            where = f"module {module!r}" + (f" series {i}" if moments.n > 1 else "")
            mean, std = float(moments.mean[i]), float(moments.std[i])
            _check_one(where, mean, std, allowed, claimed.score, bounds)


def _check_one(
    where: str,
    mean: float,
    std: float,
    allowed: PlausibleRange,
    score: str,
    bounds: Mapping[str, float | None],
) -> None:
    c, s = allowed.center, allowed.spread
    probe = (
        f"the probe median {c:.6g} and spread {s:.6g} (1.4826 x median absolute deviation) of "
        f"this adapter's own {score}s on {allowed.count} public probe tokens"
    )
    if mean < allowed.min_mean:
        raise AdmissionError(
            "implausible_stats",
            f"{where}: claimed mean {mean:.6g} is {(c - mean) / s:.3g} probe spreads below "
            f"{probe} (at most {bounds['max_mean_z']:g} allowed: mean >= {allowed.min_mean:.6g}). "
            f"{_if_honest('max-mean-z', score)}",
        )
    if mean > allowed.max_mean:
        raise AdmissionError(
            "implausible_stats",
            f"{where}: claimed mean {mean:.6g} is {(mean - c) / s:.3g} probe spreads ABOVE "
            f"{probe} (at most {bounds['max_mean_z_above']:g} allowed): no measurement of this "
            f"adapter gives it. {_if_honest('max-mean-z-above', score)}",
        )
    if std < allowed.min_std:
        raise AdmissionError(
            "implausible_stats",
            f"{where}: claimed std {std:.6g} is {s / max(std, 1e-300):.3g} times smaller than "
            f"the probe spread, from {probe} (at most {bounds['max_sigma_ratio']:g} allowed: std "
            f">= {allowed.min_std:.6g}). {_if_honest('max-sigma-ratio', score)}",
        )


def _if_honest(bound: str, score: str) -> str:
    return (
        "If this adapter is honest: its node must send the statistics seqr's own calibration "
        f"measures on the text it trained on (score {score!r}, the federation's calib-score); "
        f"the operator can give probe-text closer to the federation's domains or raise {bound} "
        "(`seqr bench plausibility` measures what that lets liars through)"
    )
