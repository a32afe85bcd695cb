"""Bounding what an adapter may claim about its own norms (routing hijack, SECURITY.md).

SEQR routes by z = (||R A x|| - mu) / sigma with mu, sigma measured by the adapter's owner on
private data (arXiv 2509.18093), so the server cannot check them against that data. But A is
shared and B is published: anyone can recompute the adapter's norms on public probe inputs,
and an adapter's honest statistics cannot be wildly narrower or lower than those.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from seqr.core.errors import AdmissionError, ValueCheckError
from seqr.core.stats import NormStatistics

__all__ = ["check_stats_plausible"]


def check_stats_plausible(
    claimed: NormStatistics,
    probe_norms: Mapping[str, np.ndarray],
    *,
    max_sigma_ratio: float,
    max_mean_z: float,
    max_mean_z_above: float | None = None,
) -> None:
    """Refuse statistics that would let an adapter win inputs that are not its own.

    SEQR routes by z = (||R A x|| - mu) / sigma. A liar claims a small mu and a tiny sigma, so
    every input gets a large z (routing hijack). ``probe_norms[module]`` holds the adapter's
    own norms ||B A x||, recomputed by the server on public probe inputs, shape (T,) or (T, n);
    with mu_p and sigma_p their mean and population std, per module and series:

      1. mean:   mu >= mu_p - max_mean_z * sigma_p  (the claimed mean may not sit more than
                 max_mean_z probe stds BELOW the probe mean; claiming more only hurts the liar,
                 and an honest adapter's own data usually gives it larger norms, not smaller);
      2. spread: sigma >= sigma_p / max_sigma_ratio  (an honest adapter's norms on its own data
                 vary at least comparably to its norms on generic text);
      3. mean from above (when ``max_mean_z_above`` is given):
                 mu <= mu_p + max_mean_z_above * sigma_p. A mean far above anything the
                 adapter produces is no hijack (it only lowers the adapter's own z-scores),
                 but it is not a measurement either, and a huge one breaks every router
                 (1e39 is infinite in float32); its own message says so. The bound is loose:
                 honest adapters do score higher on their own data than on probe text.

    Together they bound the z-score at the probe mean to (mu_p - mu) / sigma <=
    max_mean_z * max_sigma_ratio. Raises AdmissionError("implausible_stats", ...); a probe set
    that cannot measure anything (missing module, T < 2, zero spread) is a ValueCheckError,
    the server's fault and not the client's.
    """
    for module, moments in sorted(claimed.modules.items()):
        if module not in probe_norms:
            raise ValueCheckError(f"no probe norms for module {module!r}; probe every module")
        probe = np.asarray(probe_norms[module], dtype=np.float64)
        probe = probe[:, None] if probe.ndim == 1 else probe
        if probe.ndim != 2 or probe.shape[1] != moments.n or probe.shape[0] < 2:
            raise ValueCheckError(
                f"probe norms of {module!r} have shape {probe.shape}; need (T >= 2, {moments.n})"
            )
        if not np.isfinite(probe).all():
            raise ValueCheckError(f"probe norms of {module!r} contain NaN or inf")
        mu_p, sigma_p = probe.mean(axis=0), probe.std(axis=0)
        if (sigma_p <= 0).any():
            raise ValueCheckError(f"probe norms of {module!r} do not vary; use varied probe text")
        mean_z = (mu_p - moments.mean) / sigma_p  # probe stds the claimed mean sits below
        ratio = sigma_p / np.maximum(moments.std, np.finfo(np.float64).tiny)
        for i in range(moments.n):
            if mean_z[i] > max_mean_z:
                raise AdmissionError(
                    "implausible_stats",
                    f"module {module!r}: claimed mean {moments.mean[i]:.6g} is "
                    f"{mean_z[i]:.3g} probe stds below the probe mean {mu_p[i]:.6g} "
                    f"(at most {max_mean_z:g} allowed)",
                )
            if max_mean_z_above is not None and -mean_z[i] > max_mean_z_above:
                raise AdmissionError(
                    "implausible_stats",
                    f"module {module!r}: claimed mean {moments.mean[i]:.6g} is "
                    f"{-mean_z[i]:.3g} probe stds ABOVE the probe mean {mu_p[i]:.6g} (at most "
                    f"{max_mean_z_above:g} allowed): no measurement of this adapter gives it",
                )
            if ratio[i] > max_sigma_ratio:
                raise AdmissionError(
                    "implausible_stats",
                    f"module {module!r}: claimed std {moments.std[i]:.6g} is "
                    f"{ratio[i]:.3g} times smaller than the probe std {sigma_p[i]:.6g} "
                    f"(at most {max_sigma_ratio:g} allowed)",
                )
