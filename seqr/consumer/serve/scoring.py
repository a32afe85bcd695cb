"""Per-sequence SEQR over a prompt, with statistics that can change while the server runs.

The routing pass is RegistryRouter's first pass (RoutedModel: the base model on the prompt, as
peft's ``"__base__"`` rows or, with ``first_pass_dtype``, a bf16 copy of it); each LoRA module's
router gives raw scores (the norm ||R_i A x|| of SEQR, arXiv 2509.18093, or its gain per unit
||A x||) for every token, and the hooks keep each sequence's token mean per module: ``raw`` of
shape (B, M, N).

A z-score is affine per (module, adapter), so the token mean of z-scores is the z-score of the
token mean: (mean_t g_t - mu) / sigma. The decision is then the mean over modules of
(raw - mu) / sigma, exactly RoutedModel's ``aggregation="mean"`` (mean over every (token,
module) pair), for whichever (mu, sigma) are in use: the adapters' own signed statistics, or
query statistics the server measures on its own traffic (pool.py). Keeping ``raw`` also gives
the pool its sample without a second pass.

Under query statistics the same pass also takes each prompt's soft token votes
(seqr.core.model_routing.soft_votes: softmax over the routable adapters of each token's mean
module z-score, averaged over tokens), which are not a function of ``raw``: they need the
statistics before the pass. Once the pool holds enough of them, the decision is each adapter's
vote share standardised over the pool (RoutedModel's ``aggregation="soft_vote"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from seqr.core.errors import ShapeError, ValueCheckError
from seqr.core.model_routing.loss_check import Shortlist, check_pairs
from seqr.core.model_routing.modules import RoutedModule
from seqr.core.model_routing.soft_votes import SOFT_VOTE_TEMPERATURE, TokenDecisions
from seqr.core.routing import SeqrRouter
from seqr.core.routing.gain import input_energy
from seqr.core.stats import NormStatistics

# RoutedModel's first pass: a callable running the base model on (ids, mask), and the scored
# modules hooked into that model (the model itself, or its bf16 copy: first_pass_dtype).
FirstPass = tuple[Callable[[torch.Tensor, torch.Tensor], Any], list[RoutedModule]]


@dataclass(frozen=True)
class Calibration:
    """The (mu, sigma) every adapter's scores are z-scored with, per module."""

    kind: str  # "own": the adapters' signed statistics; "queries": measured on served prompts
    mean: torch.Tensor  # (M, N) float64
    std: torch.Tensor  # (M, N) float64, > 0
    routable: torch.Tensor  # (N,) bool: adapters "auto" may choose (pool.py: pending ones not)
    pool_sequences: int = 0  # prompts whose scores made these statistics (queries)
    pending: tuple[str, ...] = field(default=())  # adapters still waiting for their statistics
    # Soft token votes (queries only, once the pool holds enough votes): each adapter's (mean,
    # std) vote share over the pool, (N,) float64 each; None: the mean of z-scores decides.
    votes: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def aggregation(self) -> str:
        return "mean" if self.votes is None else "soft_vote"

    def describe(self) -> dict[str, Any]:
        """What a response says about the calibration (never the statistics themselves)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "queries":
            out["pool_sequences"] = self.pool_sequences
            out["aggregation"] = self.aggregation
        if self.pending:
            out["pending_adapters"] = list(self.pending)
        return out


@dataclass(frozen=True)
class Decision:
    """One adapter per sequence and the evidence for it."""

    indices: list[int]  # the chosen adapter per sequence
    # (B, N) float64: mean z-score over the prompt's tokens and modules, or the standardised
    # soft token vote share (Calibration.votes)
    scores: torch.Tensor
    margin: list[float | None]  # chosen minus runner-up (None: nothing else could be chosen)
    runner_up: list[int | None]
    # per sequence whose close pair the loss check decided: (chosen's, runner-up's) loss on
    # the prompt; None where it did not run
    prompt_losses: list[tuple[float, float] | None]
    # "kept" (the scores' first) or "changed" (the runner-up) where the check ran
    loss_check: list[str | None]


def check_close_pairs(
    decision: Decision,
    margin: float,
    losses_of: Callable[[list[int], list[int]], torch.Tensor],
) -> Decision:
    """``decision`` with every sequence whose runner-up is within ``margin`` decided by the
    prompt's own loss (seqr.core.model_routing.loss_check); ``losses_of(rows, adapters)``
    gives the loss of each listed row's prompt under the listed adapter."""
    rows = len(decision.indices)
    first = torch.tensor(decision.indices, dtype=torch.long)
    second = torch.tensor([f if r is None else r for f, r in
                           zip(decision.indices, decision.runner_up, strict=True)])  # fmt: skip
    close = torch.tensor([m is not None and m < margin for m in decision.margin], dtype=torch.bool)
    short = Shortlist(first, second, close)
    picked, first_loss, second_loss = check_pairs(short, losses_of)
    chosen = picked.tolist()
    swapped = [c != f for c, f in zip(chosen, decision.indices, strict=True)]
    losses: list[tuple[float, float] | None] = [None] * rows
    outcome: list[str | None] = [None] * rows
    for r in short.rows():
        pair = (float(first_loss[r]), float(second_loss[r]))
        losses[r] = pair[::-1] if swapped[r] else pair
        outcome[r] = "changed" if swapped[r] else "kept"
    return Decision(
        indices=chosen,
        scores=decision.scores,
        margin=[
            None if m is None else -m if s else m
            for m, s in zip(decision.margin, swapped, strict=True)
        ],  # fmt: skip
        runner_up=[
            f if s else r
            for f, r, s in zip(decision.indices, decision.runner_up, swapped, strict=True)
        ],  # fmt: skip
        prompt_losses=losses,
        loss_check=outcome,
    )


def own_calibration(stats: list[NormStatistics], modules: list[str]) -> Calibration:
    """Each adapter's own signed per-module moments (what RegistryRouter uses by default)."""
    mean = torch.empty(len(modules), len(stats), dtype=torch.float64)
    std = torch.empty_like(mean)
    for i, adapter in enumerate(stats):
        for m, name in enumerate(modules):
            moments = adapter.modules.get(name)
            if moments is None or moments.n != 1:
                raise ShapeError(f"adapter {i}: no statistics for LoRA module {name}")
            mean[m, i], std[m, i] = float(moments.mean[0]), float(moments.std[0])
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueCheckError("own statistics hold a non-finite mean or a std <= 0")
    return Calibration("own", mean, std, torch.ones(len(stats), dtype=torch.bool))


@dataclass(frozen=True)
class PromptScores:
    """What one routing pass measured of each prompt."""

    raw: torch.Tensor  # (B, M, N) float64 token-mean raw score per module: the pool's sample
    votes: torch.Tensor | None = None  # (B, N) soft token vote shares (votes_under), or None


def module_names(modules: list[RoutedModule]) -> tuple[str, ...]:
    return tuple(m.name for m in modules)


@torch.no_grad()
def sequence_scores(
    first_pass: FirstPass,
    ids: torch.Tensor,
    mask: torch.Tensor,
    votes_under: Calibration | None = None,
    temperature: float = SOFT_VOTE_TEMPERATURE,
) -> PromptScores:
    """Each sequence's mean raw score per module over the tokens the token rule measures
    (seqr.core.measurement, as RoutedModel and every statistic count them); with
    ``votes_under``, also its soft token votes over that calibration's routable adapters."""
    run, modules = first_pass
    for module in modules:
        if not isinstance(module.router, SeqrRouter):
            raise ShapeError(f"module {module.name} is not routed by SEQR")
    out = torch.zeros(ids.shape[0], len(modules), len(modules[0].router), dtype=torch.float64)
    tokens = TokenDecisions()  # soft votes: each token's z-scores under votes_under

    def hook_for(index: int, module: RoutedModule) -> Any:
        router: SeqrRouter = module.router  # type: ignore[assignment]

        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = (args[0] if args else kwargs["x"]).to(module.A.dtype)  # (B, T, d_in)
            h = module.project(x)  # (B, T, r) = A x
            keep = module.measured(x, h, mask.to(x.device)).unsqueeze(-1)  # (B, T, 1)
            if module.score == "gain":
                h = h / input_energy(h)
            norms = router.norms_from_projection(h.reshape(-1, h.shape[-1]))
            norms = norms.reshape(*x.shape[:-1], -1).double()  # (B, T, N)
            kept = torch.where(keep, norms, torch.zeros((), dtype=norms.dtype)).sum(dim=1)
            out[:, index] = (kept / keep.sum(dim=1).clamp_min(1)).cpu()
            if votes_under is not None:
                mean = votes_under.mean[index].to(norms)
                tokens.add((norms - mean) / votes_under.std[index].to(norms), keep.squeeze(-1))

        return hook

    handles = [
        m.layer.register_forward_hook(hook_for(i, m), with_kwargs=True)
        for i, m in enumerate(modules)
    ]
    try:
        run(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    if votes_under is None:
        return PromptScores(out)
    # pending adapters (not routable) get no share of any token
    return PromptScores(out, tokens.votes(temperature, votes_under.routable).cpu())


def decide(scored: PromptScores, calibration: Calibration) -> Decision:
    """SEQR per sequence: argmax over routable adapters of mean_m (raw - mu) / sigma, or of
    the standardised soft token vote share when the calibration has vote statistics."""
    raw = scored.raw
    if raw.shape[1:] != calibration.mean.shape:
        raise ShapeError(
            f"scores of shape {tuple(raw.shape[1:])} do not fit statistics of shape "
            f"{tuple(calibration.mean.shape)}"
        )
    if calibration.votes is None:
        scores = ((raw - calibration.mean) / calibration.std).mean(dim=1)  # (B, N)
    elif scored.votes is None:
        raise ShapeError("soft-vote statistics need the prompts' votes (sequence_scores "
                         "with votes_under=the calibration)")  # fmt: skip
    else:
        mean, std = calibration.votes
        scores = (scored.votes - mean) / std
    masked = scores.masked_fill(~calibration.routable, float("-inf"))
    indices, margins, runners = [], [], []
    for row in masked:
        order = torch.argsort(row, descending=True, stable=True).tolist()
        best = order[0]
        runner = order[1] if len(order) > 1 and torch.isfinite(row[order[1]]) else None
        indices.append(best)
        runners.append(runner)
        margins.append(None if runner is None else float(row[best] - row[runner]))
    return Decision(indices, scores, margins, runners, [None] * len(indices), [None] * len(indices))
