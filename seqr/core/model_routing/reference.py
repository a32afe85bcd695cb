"""Statistics against a shared public reference corpus, measured by whoever routes.

SEQR z-scores each adapter with the mean and std of its norms on its own training data (arXiv
2509.18093). Two weaknesses show up in practice: an input domain that excites every adapter's
norms (or one adapter's, on its own data, less) shifts the z-scores of all foreign inputs, and
the statistics are claimed by the adapter's author (a routing-hijack surface, docs/THREATS.md).
Measuring every adapter's norms on the SAME public reference text removes both: the z-score
then says how much more this input excites adapter i than generic text does, and no one but
the router supplies the numbers. The norm convention is calibration's (unscaled ||B A x|| on
the base model's module inputs), so the result plugs into RoutedModel(stats=...).

The two calibrations fail differently (own statistics: an adapter with narrow statistics takes
foreign inputs; reference ones: domains near the reference text look alike), so
``blend_statistics`` averages both z-scores, which is again a z-score with its own mean and std.

Query statistics (``per_sequence=True``) are the moments of each SEQUENCE's token-mean score
over a pool of unlabeled inputs like the ones the router serves (its own recent queries, kept
locally: no one else's data). A per-sequence decision averages token scores, and
(mean_t g_t - m) / s = mean_t (g_t - m) / s, so z-scoring every token with sequence-level
moments is exactly standardising each adapter's sequence score across the traffic: the spread
that matters for a per-sequence choice, not the token-level spread, which over- or
understates it by how correlated a module's token scores are within a sequence.

The same holds one level up (``decision_standardized``): the decision averages the M module
z-scores, and that average's spread over the traffic differs between adapters (one adapter's
modules agree more with each other than another's), so the adapter whose modules are most
correlated wins foreign inputs more often. Query statistics therefore also standardise each
adapter's decision score over the same pool: a per-adapter affine change, folded into every
module's mean and std, so the result is again an ordinary z-score (routers, brute force and
per-token routing apply it unchanged). Measured on two disjoint sets of domains
(docs/RESULTS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from seqr.core.errors import DataError, ShapeError
from seqr.core.model_routing.modules import RoutedModule, build_routed_modules
from seqr.core.stats import NormStatistics, RunningMoments, ScoreKind
from seqr.core.value_bounds import float32_usable

log = logging.getLogger("seqr.routing")


@torch.no_grad()
def reference_statistics(
    peft_model: Any,
    adapters: Sequence[str],
    batches: Iterable[torch.Tensor],
    *,
    score: ScoreKind = "gain",
    per_sequence: bool = False,
) -> dict[str, NormStatistics]:
    """Per-module statistics of every adapter's ``score`` ("gain" or "norm", as the
    federation's calib_score) on batches of token ids (no padding): of the token scores the
    token rule counts (seqr.core.measurement, as calibration counts them), or with
    ``per_sequence`` of each sequence's mean over those tokens (query statistics).

    An adapter whose scores are not finite in the router's dtype, or whose statistics are not
    usable there (std 0, 1/std overflowing), is left out of the result with a warning naming
    it: one adapter that cannot be scored never fails the others."""
    modules = build_routed_modules(peft_model, adapters, score=score)  # no statistics: raw
    moments = {m.name: RunningMoments(len(adapters)) for m in modules}
    sequences: dict[str, list[torch.Tensor]] = {m.name: [] for m in modules}  # per_sequence
    unscorable = torch.zeros(len(adapters), dtype=torch.bool)

    def hook_for(module: RoutedModule) -> Any:
        def hook(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = (args[0] if args else kwargs["x"]).to(module.A.dtype)  # (B, T, d_in)
            h = module.project(x)  # (B, T, r)
            keep = module.measured(x, h, None)  # (B, T): the token rule
            flat = x.reshape(-1, x.shape[-1])
            scores = module.scores(flat, h.reshape(-1, h.shape[-1]))  # (B * T, N)
            if per_sequence:  # each sequence's mean over its measured tokens
                per_token = scores.reshape(*x.shape[:-1], -1)
                kept = keep.unsqueeze(-1)
                total = torch.where(kept, per_token, torch.zeros((), dtype=scores.dtype))
                scores = total.sum(dim=1) / kept.sum(dim=1).to(scores.dtype)  # (B, N)
            else:
                scores = scores[keep.reshape(-1)]
            finite = torch.isfinite(scores)
            unscorable.logical_or_(~finite.all(dim=0).cpu())
            scores = torch.where(finite, scores, torch.zeros_like(scores))
            moments[module.name].update(scores)
            if per_sequence:
                sequences[module.name].append(scores.double().cpu())

        return hook

    handles = [m.layer.register_forward_hook(hook_for(m), with_kwargs=True) for m in modules]
    try:
        for input_ids in batches:
            peft_model(
                input_ids=input_ids,
                adapter_names=["__base__"] * int(input_ids.shape[0]),
                logits_to_keep=1,
            )
    finally:
        for handle in handles:
            handle.remove()
    if min(m.count for m in moments.values()) < 2:  # counted: sequences, or measured tokens
        unit = "sequences" if per_sequence else "measured tokens"
        raise DataError(f"the corpus gave fewer than 2 {unit}; give more text")
    if per_sequence:
        _standardize_decisions(moments, sequences)
    out = {}
    for i, adapter in enumerate(adapters):
        stats = NormStatistics(
            {
                name: RunningMoments(1, m.count, m.mean[i : i + 1].copy(), m.m2[i : i + 1].copy())
                for name, m in moments.items()
            },
            score=score,
        )
        problem = "scores not finite in float32" if unscorable[i] else unusable_statistics(stats)
        if problem:
            log.warning("adapter %s left out of the measured statistics: %s", ascii(adapter),
                        problem)  # fmt: skip
            continue
        out[adapter] = stats
    return out


def _standardize_decisions(
    moments: dict[str, RunningMoments], sequences: Mapping[str, list[torch.Tensor]]
) -> None:
    """Query statistics one level up (decision_standardized), in place."""
    names = list(moments)
    values = np.stack([torch.cat(sequences[n]).numpy() for n in names], axis=1)  # (S, M, N)
    mean = np.stack([moments[n].mean for n in names])  # (M, N)
    std = np.maximum(np.stack([moments[n].std for n in names]), 1e-12)
    mean, std = decision_standardized(mean, std, values)
    for i, name in enumerate(names):
        m = moments[name]
        moments[name] = RunningMoments(m.n, m.count, mean[i].copy(), std[i] ** 2 * m.count)


def pool_statistics(
    values: np.ndarray, *, standardize_decision: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Query statistics of an equally weighted pool ``values`` (S, M, N) of per-sequence raw
    scores: each module's (mean, std) over the pool, then (by default) each adapter's decision
    score standardised over it too (decision_standardized)."""
    mean, std = values.mean(axis=0), np.maximum(values.std(axis=0), 1e-12)
    return decision_standardized(mean, std, values) if standardize_decision else (mean, std)


def decision_standardized(
    mean: np.ndarray, std: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (M, N), under which every adapter's decision score, the mean over
    the M modules of its z-scores, has mean 0 and std 1 over the pool ``values`` (S, M, N)
    of per-sequence raw scores (``weights``: (S,) summing to 1; None: equal).

    With a = mean_m (g_m - mu_m) / s_m and its pool moments (c, d) per adapter,
    (a - c) / d = mean_m (g_m - mu_m - s_m c) / (s_m d): mean mu + s c, std s d.
    """
    w = np.full(len(values), 1.0 / len(values)) if weights is None else weights
    decision = ((values - mean) / std).mean(axis=1)  # (S, N)
    center = w @ decision  # (N,)
    spread = np.sqrt(w @ (decision - center) ** 2)
    spread = np.maximum(spread, 1e-12)  # a constant decision score must not divide by 0
    return mean + std * center, std * spread


def unusable_statistics(stats: NormStatistics) -> str | None:
    """Why a router cannot z-score with these statistics (count 0, or a mean / std / 1/std
    that is not finite and positive in float32), or None when it can."""
    for module, m in sorted(stats.modules.items()):
        if m.count < 1:
            return f"module {ascii(module)} statistics come from no values"
        for mean, std in zip(m.mean.tolist(), m.std.tolist(), strict=True):
            if not float32_usable(mean, std):
                where = f"module {ascii(module)}"
                return f"{where}: mean {mean:.4g} / std {std:.4g} unusable in float32"
    return None


def blend_statistics(
    own: Mapping[str, NormStatistics], reference: Mapping[str, NormStatistics]
) -> dict[str, NormStatistics]:
    """Statistics whose z-score is the mean of the own and the reference z-scores.

    (g - mu_o) / s_o + (g - mu_r) / s_r = (g - mu) * (1 / s_o + 1 / s_r), so the average is
    (g - mu) / s with s = 2 / (1 / s_o + 1 / s_r) (harmonic mean of the stds) and
    mu = s (mu_o / s_o + mu_r / s_r) / 2: an ordinary z-score any router can apply.
    """
    if set(own) != set(reference):  # calibrated_statistics drops unscorable ones first
        raise ShapeError(
            f"own statistics cover adapters {sorted(own)} but reference ones {sorted(reference)}"
        )
    return {name: _blend(own[name], reference[name], name) for name in own}


def _blend(own: NormStatistics, ref: NormStatistics, adapter: str) -> NormStatistics:
    if own.score != ref.score or set(own.modules) != set(ref.modules):
        raise ShapeError(
            f"adapter {adapter!r}: own and reference statistics measure different scores or "
            "modules; compute the reference with the same score and LoRA modules"
        )
    modules = {}
    for module, o in own.modules.items():
        r = ref.modules[module]
        std_o, std_r = np.maximum(o.std, 1e-12), np.maximum(r.std, 1e-12)
        std = 2.0 / (1.0 / std_o + 1.0 / std_r)
        mean = std * (o.mean / std_o + r.mean / std_r) / 2.0
        count = min(o.count, r.count)
        modules[module] = RunningMoments(o.n, count, mean, std**2 * count)
    return NormStatistics(modules, score=own.score)
