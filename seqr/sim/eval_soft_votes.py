"""Soft token votes (seqr.core.model_routing.soft_votes) on the held-out rows, and their check.

The shared pass (eval_scores.py) keeps per-sequence token means, from which every linear
calibration follows; soft votes are a non-linear function of each token's decision score
under the query statistics, which exist only after that pass has seen the validation rows. So
this is one more base-model pass over the held-out rows with SEQR's hooks only (brute force
too on test rows, to show the votes are exact): about a third of the shared pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from seqr import BruteForceRouter
from seqr.core.model_routing import build_routed_modules
from seqr.core.model_routing.soft_votes import soft_votes
from seqr.core.routing.gain import input_energy
from seqr.core.stats import ScoreKind
from seqr.sim.eval_scores import Calibration
from seqr.sim.lm_loss import BASE, hidden_states, merged_adapter


@dataclass(frozen=True)
class SoftVotes:
    validation: torch.Tensor  # (S_val, N) vote shares, SEQR
    test: torch.Tensor  # (S_test, N) vote shares, SEQR
    test_brute_force: torch.Tensor  # (S_test, N) the same from brute-force norms


class _TokenSums:
    """Per-token sums over modules of z-scores on the tokens each module measures."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # (B, T, N)
        self.count: torch.Tensor | None = None  # (B, T)

    def add(self, z: torch.Tensor, keep: torch.Tensor) -> None:
        part = torch.where(keep.unsqueeze(-1), z.double(), torch.zeros((), dtype=torch.float64))
        n = keep.to(torch.float64)
        self.total = part if self.total is None else self.total + part
        self.count = n if self.count is None else self.count + n

    def votes(self, temperature: float) -> torch.Tensor:
        assert self.total is not None and self.count is not None
        measured = self.count > 0
        decisions = self.total / self.count.clamp_min(1).unsqueeze(-1)
        return soft_votes(decisions, measured, temperature)


@torch.no_grad()
def score_soft_votes(
    peft_model: Any,
    adapters: Sequence[str],
    calibration: Calibration,
    score: ScoreKind,
    *,
    validation: Sequence[torch.Tensor],
    test: Sequence[torch.Tensor],
    temperature: float,
    progress: Callable[[int], None] | None = None,
) -> SoftVotes:
    """Vote shares of every held-out row under ``calibration`` (the query statistics)."""
    seqr_modules = build_routed_modules(peft_model, adapters, score=score)
    brute_modules = build_routed_modules(
        peft_model, adapters, score=score, router_factory=BruteForceRouter
    )
    sums: dict[str, _TokenSums] = {}
    with_brute = False

    def hook_for(index: int, module: Any, brute: Any) -> Any:
        mean, std = calibration.mean[index].float(), calibration.std[index].float()

        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = (args[0] if args else kwargs["x"]).to(module.A.dtype)
            flat = x.reshape(-1, x.shape[-1])
            h = module.project(flat)
            keep = module.measured(x, h.reshape(*x.shape[:-1], -1), None)
            energy = input_energy(h)
            scaled = h / energy if score == "gain" else h
            raw = module.router.scores_from_projection(scaled).float()
            sums["seqr"].add(((raw - mean) / std).reshape(*x.shape[:-1], -1), keep)
            if with_brute:  # brute force's own A once, every B_i (eval_scores does the same)
                unit = flat / energy.to(flat.dtype) if score == "gain" else flat
                norms = brute.router.norms_shared_projection(unit).float()
                sums["brute"].add(((norms - mean) / std).reshape(*x.shape[:-1], -1), keep)

        return hook

    handles = [
        m.layer.register_forward_hook(hook_for(i, m, b), with_kwargs=True)
        for i, (m, b) in enumerate(zip(seqr_modules, brute_modules, strict=True))
    ]
    out: dict[str, list[torch.Tensor]] = {"validation": [], "test": [], "brute": []}
    try:
        with merged_adapter(peft_model, BASE):
            for phase, batches in (("validation", validation), ("test", test)):
                with_brute = phase == "test"
                for input_ids in batches:
                    sums.clear()
                    sums["seqr"], sums["brute"] = _TokenSums(), _TokenSums()
                    hidden_states(peft_model, input_ids)
                    out[phase].append(sums["seqr"].votes(temperature))
                    if with_brute:
                        out["brute"].append(sums["brute"].votes(temperature))
                    if progress is not None:
                        progress(int(input_ids.shape[0]))
    finally:
        for handle in handles:
            handle.remove()
    return SoftVotes(*(torch.cat(out[k]) for k in ("validation", "test", "brute")))
