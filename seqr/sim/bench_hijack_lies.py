"""The lies of `seqr bench hijack`, and what the plausibility bounds leave an attacker.

A liar keeps its honestly trained B and re-signs its export with other statistics:
``scaled_stats`` (the plain lie: mean and std scaled down) or ``bound_stats`` (the largest lie
check_stats_plausible still accepts: mean = c_p - max_mean_z s_p, std = s_p / max_sigma_ratio,
with c_p, s_p the median and robust spread of the adapter's own scores on the server's public
probe, seqr.core.stats_plausibility).

``bound_sweep`` measures, for a grid of bounds, what a bound-hugging liar captures and how many
honest adapters the same bounds would refuse. It needs no routing pass per grid point: with
mean aggregation a sequence's score is the mean over modules of (mean_t n_tm - mu_m) / sigma_m,
so the liar's per-module, per-sequence mean scores give its score under any statistics.

``crafted_b`` lies with weights instead, claiming nothing: a rank-1 B aimed at where public
text's projections point, to see what query statistics (which ignore every claim) leave it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from seqr.core.errors import AdmissionError
from seqr.core.manifest import NORM_STATS_NAME, parse_manifest, read_export, sign_export
from seqr.core.stats import NormStatistics, RunningMoments, ScoreKind
from seqr.core.stats_plausibility import check_stats_plausible, plausible_range

SWEEP_MEAN_Z = (0.0, 0.5, 1.0, 2.0)
SWEEP_SIGMA_RATIO = (1.0, 1.5, 3.0)


def moments(mean: float, std: float, count: int) -> RunningMoments:
    return RunningMoments(1, count=count, mean=np.array([mean]), m2=np.array([std * std * count]))


def scaled_stats(stats: NormStatistics, mean_factor: float, std_factor: float) -> NormStatistics:
    out = NormStatistics(score=stats.score)
    for name, m in stats.modules.items():
        out.modules[name] = moments(
            float(m.mean[0]) * mean_factor, float(m.std[0]) * std_factor, m.count
        )
    return out


def bound_stats(
    probe_values: Mapping[str, np.ndarray],
    max_mean_z: float,
    max_sigma_ratio: float,
    score: ScoreKind = "norm",
    *,
    past_mean: float = 0.0,
    past_std: float = 0.0,
) -> NormStatistics:
    """The largest lie the plausibility check accepts, per module (just inside both bounds,
    from plausible_range on the adapter's probe values of the kind the statistics measure,
    ``score``). ``past_mean`` > 0 moves the mean that many probe spreads below its bound,
    ``past_std`` > 0 divides the std by (1 + past_std): the careful liar just beyond a bound."""
    out = NormStatistics(score=score)
    for name, values in probe_values.items():
        allowed = plausible_range(values, max_sigma_ratio=max_sigma_ratio, max_mean_z=max_mean_z)
        mean = allowed.center - (max_mean_z * (1 - 1e-6) + past_mean) * allowed.spread
        std = allowed.min_std * (1 + 1e-6) / (1 + past_std)
        out.modules[name] = moments(max(mean, 1e-12), std, int(np.size(values)))
    return out


def resign(
    src: Path, dest: Path, key: Any, stats: NormStatistics, seconds: int
) -> dict[str, bytes]:
    """The export in ``src`` with other statistics, signed again by the same key, later."""
    shutil.copytree(src, dest)
    m = parse_manifest((dest / "manifest.json").read_bytes())
    (dest / NORM_STATS_NAME).write_bytes(stats.to_json_bytes())
    sign_export(
        dest,
        key,
        name=m.name,
        base_model_sha256=m.base_model_sha256,
        a_seed=m.a_seed,
        a_sha256=m.a_sha256,
        rank=m.rank,
        alpha=m.alpha,
        target_modules=m.target_modules,
        example_count=m.example_count,
        created=m.created + timedelta(seconds=seconds),
    )
    return read_export(dest)


def sequence_scores(
    per_sequence_norms: Mapping[str, np.ndarray], stats: NormStatistics
) -> np.ndarray:
    """(S,) mean over modules of (mean_t n_tm - mu_m) / sigma_m (RoutedModel's mean score)."""
    parts = [(per_sequence_norms[name] - m.mean[0]) / m.std[0] for name, m in stats.modules.items()]
    return np.mean(parts, axis=0)


def bound_sweep(
    liar_public: Mapping[str, np.ndarray],
    liar_per_sequence: Mapping[str, np.ndarray],
    honest_best: np.ndarray,
    honest: Mapping[str, tuple[NormStatistics, Mapping[str, np.ndarray]]],
) -> list[dict[str, Any]]:
    """Per (max_mean_z, max_sigma_ratio): the bound liar's capture share of the honest
    sequences (``honest_best``: each sequence's best honest score) and the honest adapters
    the same bounds refuse (``honest``: name -> (claimed stats, probe norms))."""
    rows = []
    for z in SWEEP_MEAN_Z:
        for ratio in SWEEP_SIGMA_RATIO:
            liar = sequence_scores(liar_per_sequence, bound_stats(liar_public, z, ratio))
            refused = []
            for name, (stats, norms) in honest.items():
                try:
                    check_stats_plausible(stats, norms, max_sigma_ratio=ratio, max_mean_z=z)
                except AdmissionError:
                    refused.append(name)
            rows.append(
                {
                    "max_mean_z": z,
                    "max_sigma_ratio": ratio,
                    "bound_liar_capture_share": float(np.mean(liar > honest_best)),
                    "honest_refused": refused,
                }
            )
    return rows


def crafted_b(
    projections: Mapping[str, Any], b_tensors: Mapping[str, str], like: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """lora_B tensor name -> rank-1 B = u w^T, shaped as in ``like`` (an honest adapter's
    tensors): u a unit vector, w the mean direction of h / ||h|| over ``projections`` (module ->
    (T, r) torch h = A x of public text, e.g. the operator's probe). Its gain ||B h|| / ||h|| =
    |cos(h, w)| is large on typical inputs of every domain, with no data of any domain."""
    out = {}
    for module, h in projections.items():
        mean_direction = (h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)).mean(dim=0)
        w = (mean_direction / mean_direction.norm()).double().numpy()
        u = np.zeros(like[b_tensors[module]].shape[0])
        u[0] = 1.0  # the scale is irrelevant under query statistics
        out[b_tensors[module]] = np.outer(u, w).astype(np.float32)
    return out
