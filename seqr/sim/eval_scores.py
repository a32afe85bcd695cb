"""Every routing method's scores from ONE base-model pass per batch, with the work shared.

Per-sequence routing needs only each module's input x on the base model (adapters off), so a
single forward with hooks feeds every method. Work is shared wherever the maths allows:

- SEQR under every calibration (own, reference, blended and query statistics) and raw SEQR
  are one computation: h = A x and the raw score once per module. A z-score is affine per
  module and adapter, so it commutes with the token mean: each calibration's per-sequence
  z-scores come from the raw token means afterwards (exact up to rounding).
- The statistics measured on text (reference text for ``seqr_public``, the unlabeled
  validation inputs for ``seqr_queries``) come from the same pass: reference rows run first,
  then validation, then test, instead of passes of their own.
- SpectR's score is the exact raw norm, which raw SEQR computes: one computation for both.
- The ARROWs score only held-out rows (not the reference text), and brute force, which is
  there to check SEQR's exactness on the test rows, only those.

Per sequence each method keeps its raw mean score of every module over the tokens routers
measure (seqr.core.measurement), (S, M, N), so each layer subset can be reported on validation
afterwards; per token (test rows) the module-mean
score under each calibration, for per-token accuracy. Each method is timed on its own work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from seqr import ArrowRouter, BruteForceRouter
from seqr.core.errors import ValueCheckError
from seqr.core.model_routing import RoutedModule, blend_statistics, build_routed_modules
from seqr.core.model_routing.reference import decision_standardized
from seqr.core.model_routing.soft_votes import TokenDecisions
from seqr.core.routing.gain import input_energy
from seqr.core.stats import NormStatistics, RunningMoments, ScoreKind
from seqr.sim.lm_loss import BASE, causal_lm_losses, hidden_states, merged_adapter

# extra scorers on raw module inputs: method -> (module name -> (x (M, d_in) -> (M, N)))
ExtraScorers = Mapping[str, Mapping[str, Callable[[torch.Tensor], torch.Tensor]]]
# Methods scored besides SEQR, each on raw scores (brute force is z-scored afterwards).
# Brute force checks that SEQR is exact: the report compares the two on test rows only, with
# SEQR's layers, so it is not scored on validation rows (it is the costliest scorer).
# SpectR is not among them: its score is the exact raw norm ||B_i A x|| (through the SVD of
# B_i A), the very number seqr_raw measures, so one computation serves both (its speed is
# measured apart, in the routing-time benchmark).
OTHER_ROUTERS: dict[str, tuple[Callable[..., Any], ScoreKind | None]] = {  # (router, score kind)
    "brute_force": (BruteForceRouter, None),  # ||B_i A x|| directly, the calibration's kind
    "arrow": (ArrowRouter, "norm"),  # abs(v_i . x), as in the ARROW paper
}
TEST_ONLY = frozenset({"brute_force"})


@dataclass(frozen=True)
class Calibration:
    """Per-module, per-adapter statistics as (M, N) float64 tensors: z = (g - mean) / std."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_stats(
        cls, stats: Mapping[str, NormStatistics], adapters: Sequence[str], modules: Sequence[str]
    ) -> Calibration:
        mean = np.empty((len(modules), len(adapters)))
        std = np.empty_like(mean)
        for j, adapter in enumerate(adapters):
            for i, module in enumerate(modules):
                moments = stats[adapter].modules[module]
                mean[i, j], std[i, j] = float(moments.mean[0]), float(moments.std[0])
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueCheckError("statistics hold a non-finite mean or a std <= 0")
        return cls(torch.from_numpy(mean), torch.from_numpy(std))

    def z(self, module_means: torch.Tensor) -> torch.Tensor:
        """(S, M, N) raw token means -> z-scores (the token mean of the token z-scores)."""
        return (module_means.double() - self.mean) / self.std


@dataclass
class HeldOutScores:
    """What the shared pass measured on the held-out rows (validation, then test)."""

    # "seqr" (raw) and other methods -> (S, M, N); TEST_ONLY methods: (S_test, M, N)
    module_means: dict[str, torch.Tensor]  # "seqr": the calibration's kind; "seqr_raw": norms
    token_means: dict[str, torch.Tensor]  # method -> (S_test, T, N) module-mean token scores
    calibrations: dict[str, Calibration]  # "seqr", "seqr_public", ... -> statistics
    module_names: list[str]
    module_layers: list[int | None]
    seconds: dict[str, float] = field(default_factory=dict)  # scoring time per method
    rows: int = 0  # held-out rows scored
    base_loss: torch.Tensor | None = None  # (S_test,) the base model's loss per test row
    # Soft token votes under the query statistics on test rows: "seqr" and "brute_force" ->
    # (S_test, N) (with soft_vote_temperature; validation rows: eval_soft_votes.py)
    test_votes: dict[str, torch.Tensor] = field(default_factory=dict)


def _moments_as_stats(
    moments: Mapping[str, RunningMoments], adapters: Sequence[str], score: ScoreKind
) -> dict[str, NormStatistics]:
    """Per-module moments over N adapters -> one NormStatistics per adapter (n = 1 each),
    the form reference_statistics returns."""
    return {
        adapter: NormStatistics(
            {
                name: RunningMoments(1, m.count, m.mean[i : i + 1].copy(), m.m2[i : i + 1].copy())
                for name, m in moments.items()
            },
            score=score,
        )
        for i, adapter in enumerate(adapters)
    }


@torch.no_grad()
def score_heldout(
    peft_model: Any,
    adapters: Sequence[str],
    own_stats: Mapping[str, NormStatistics],
    *,
    validation: Sequence[torch.Tensor],
    test: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor] = (),
    extra: ExtraScorers | None = None,
    progress: Callable[[int], None] | None = None,
    soft_vote_temperature: float | None = None,
) -> HeldOutScores:
    """Score batches of (B, T) token ids (no padding): reference, validation, then test.

    Calibrations: "seqr" (own statistics), "seqr_public" and "seqr_blend" (with reference
    batches), "seqr_queries" (sequence-level moments over the validation inputs, unlabeled).
    """
    score = own_stats[adapters[0]].score  # router statistics measure the adapters' kind
    seqr_modules = build_routed_modules(peft_model, adapters, score=score)  # raw scores
    names = [m.name for m in seqr_modules]
    others = {
        method: {m.name: m for m in build_routed_modules(peft_model, adapters,
                                                          score=kind or score,
                                                          router_factory=factory)}
        for method, (factory, kind) in OTHER_ROUTERS.items()
    }  # fmt: skip
    extra = extra or {}
    calibrations = {"seqr": Calibration.from_stats(own_stats, adapters, names)}
    own = calibrations["seqr"]
    seconds: dict[str, float] = {"seqr": 0.0, **{m: 0.0 for m in [*others, *extra]}}
    phase = "reference"
    ref_moments = {n: RunningMoments(len(adapters)) for n in names}
    current: dict[str, dict[str, torch.Tensor]] = {}  # method -> module -> (B, T, N)
    vote_sums: dict[str, TokenDecisions] = {}  # test rows: "seqr", "brute_force" -> this batch's
    measured: dict[str, torch.Tensor] = {}  # module -> (B, T) bool: the token rule's tokens
    token_parts: dict[str, dict[str, torch.Tensor]] = {}  # label -> module -> (B, T, N)

    def add_token(label: str, module: str, values: torch.Tensor) -> None:
        token_parts.setdefault(label, {})[module] = values

    def hook_for(index: int, module: RoutedModule) -> Any:
        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = (args[0] if args else kwargs["x"]).to(module.A.dtype)
            shape = x.shape[:-1]
            flat = x.reshape(-1, x.shape[-1])
            start = time.perf_counter()
            # One A x for every method: every router of this module holds the same shared A.
            h = module.project(flat)
            # The tokens a sequence's mean and the statistics count, as routers count them
            # (seqr.core.measurement's token rule); per-token scores keep every token.
            keep = module.measured(x, h.reshape(*shape, -1), None)
            measured[module.name] = keep
            router: Any = module.router  # a SeqrRouter without statistics: raw norms
            # The calibrated score exactly as RoutedModule.scores computes it (gain: h / ||h||),
            # without scaling x, which SEQR never reads.
            energy = input_energy(h)
            scaled = h / energy if score == "gain" else h
            raw = router.scores_from_projection(scaled).float()  # (B * T, N)
            if phase == "reference":
                ref_moments[module.name].update(raw[keep.reshape(-1)])
                return
            # seqr_raw: the paper's raw norm ||B_i A x|| = gain * ||A x|| (no z-score).
            norms = raw if score == "norm" else raw * energy.float()
            seconds["seqr"] += time.perf_counter() - start  # held-out rows only
            current.setdefault("seqr", {})[module.name] = raw.reshape(*shape, -1)
            current.setdefault("seqr_raw", {})[module.name] = norms.reshape(*shape, -1)
            for method, by_name in others.items():
                if method in TEST_ONLY and phase != "test":
                    continue
                start = time.perf_counter()
                routed = by_name[module.name]
                if isinstance(routed.router, BruteForceRouter):  # its own A once, all B_i
                    unit = flat / energy.to(flat.dtype) if routed.score == "gain" else flat
                    values = routed.router.norms_shared_projection(unit).float()
                elif routed.score == "gain":  # x and h scaled by 1 / ||h|| inside
                    values = routed.scores(flat, h).float()
                else:  # raw norms (or ARROW's proxy) need only x
                    values = routed.router.scores(flat).float()
                seconds[method] += time.perf_counter() - start
                current.setdefault(method, {})[module.name] = values.reshape(*shape, -1)
            for method, scorers in extra.items():
                start = time.perf_counter()
                values = scorers[module.name](flat).float()
                seconds[method] += time.perf_counter() - start
                current.setdefault(method, {})[module.name] = values.reshape(*shape, -1)
            if phase == "test":  # per-token scores: z under each calibration, else raw
                for label, cal in calibrations.items():
                    mean, std = cal.mean[index].float(), cal.std[index].float()
                    add_token(label, module.name, ((raw - mean) / std).reshape(*shape, -1))
                add_token("seqr_raw", module.name, norms.reshape(*shape, -1))
                own_mean, own_std = (t[index].float() for t in (own.mean, own.std))
                brute = current["brute_force"][module.name]
                add_token("brute_force_z", module.name, (brute - own_mean) / own_std)
                if vote_sums:  # soft votes: per-token z-scores under the query statistics
                    queries = calibrations["seqr_queries"]
                    q_mean, q_std = queries.mean[index].float(), queries.std[index].float()
                    seqr_z = (raw.reshape(*shape, -1) - q_mean) / q_std
                    vote_sums["seqr"].add(seqr_z, keep)
                    vote_sums["brute_force"].add((brute - q_mean) / q_std, keep)
                for method in [*others, *extra]:
                    if method != "brute_force":
                        add_token(method, module.name, current[method][module.name])

        return hook

    handles = [
        m.layer.register_forward_hook(hook_for(i, m), with_kwargs=True)
        for i, m in enumerate(seqr_modules)
    ]
    module_means: dict[str, list[torch.Tensor]] = {}
    token_means: dict[str, list[torch.Tensor]] = {}
    rows = 0
    base_losses: list[torch.Tensor] = []
    test_votes: dict[str, list[torch.Tensor]] = {}

    def run(batches: Sequence[torch.Tensor]) -> None:
        nonlocal rows
        for input_ids in batches:
            current.clear()
            measured.clear()
            token_parts.clear()
            if phase == "test" and soft_vote_temperature is not None:
                vote_sums.update({m: TokenDecisions() for m in ("seqr", "brute_force")})
            # On test rows the base model's held-out loss comes from this same forward
            # instead of a pass of its own (the same call as seqr/sim/eval_losses.py makes,
            # so the same numbers); other rows need no output head.
            if phase == "test":
                base_losses.append(causal_lm_losses(peft_model, input_ids))
            else:
                hidden_states(peft_model, input_ids)
            if phase != "reference":
                rows += int(input_ids.shape[0])
                keep = torch.stack([measured[n] for n in names], dim=1).unsqueeze(-1)  # B,M,T,1
                count = keep.sum(dim=2).float()  # (B, M, 1): >= 1 (measurement rule 4)
                for method, per_module in current.items():
                    stacked = torch.stack([per_module[n] for n in names], dim=1)  # (B,M,T,N)
                    kept = torch.where(keep, stacked, torch.zeros((), dtype=stacked.dtype))
                    module_means.setdefault(method, []).append(kept.sum(dim=2) / count)
            for method, sums in vote_sums.items():
                assert soft_vote_temperature is not None
                test_votes.setdefault(method, []).append(sums.votes(soft_vote_temperature))
            for label, parts in token_parts.items():
                stacked = torch.stack([parts[n] for n in names], dim=1)  # (B, M, T, N)
                token_means.setdefault(label, []).append(stacked.mean(dim=1))
            if progress is not None:
                progress(int(input_ids.shape[0]))

    # Adapters off for the whole pass (entering peft's disable_adapter walks every module:
    # ~0.1 s, measured, so not once per batch).
    try:
        with merged_adapter(peft_model, BASE):
            if reference:
                run(reference)
                ref = _moments_as_stats(ref_moments, adapters, score)
                calibrations["seqr_public"] = Calibration.from_stats(ref, adapters, names)
                blend = blend_statistics(own_stats, ref)
                calibrations["seqr_blend"] = Calibration.from_stats(blend, adapters, names)
            phase = "validation"
            run(validation)
            # Query statistics: each sequence's token-mean score, its moments over the validation
            # inputs (seqr.core.model_routing.reference, per_sequence=True), labels unused.
            val_means = torch.cat(module_means["seqr"])  # (S_val, M, N)
            queries = {n: RunningMoments(len(adapters)).update(val_means[:, i]) for i, n in
                       enumerate(names)}  # fmt: skip
            per_module = Calibration.from_stats(
                _moments_as_stats(queries, adapters, score), adapters, names
            )
            calibrations["seqr_queries_per_module"] = per_module
            # ... and each adapter's decision score standardised over the same inputs
            # (seqr.core.model_routing.reference.decision_standardized).
            mean, std = decision_standardized(
                per_module.mean.numpy(), per_module.std.numpy(), val_means.double().numpy()
            )
            calibrations["seqr_queries"] = Calibration(*map(torch.from_numpy, (mean, std)))
            phase = "test"
            run(test)
    finally:
        for handle in handles:
            handle.remove()
    return HeldOutScores(
        module_means={m: torch.cat(v) for m, v in module_means.items()},
        token_means={m: torch.cat(v) for m, v in token_means.items()},
        calibrations=calibrations,
        module_names=names,
        module_layers=[m.layer_index for m in seqr_modules],
        seconds=seconds,
        rows=rows,
        base_loss=torch.cat(base_losses) if base_losses else None,
        test_votes={m: torch.cat(v) for m, v in test_votes.items()},
    )
