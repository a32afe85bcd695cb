"""The one measurement: each adapter's routing score per token and module, and which tokens count.

SEQR routes by z = (s - mu) / sigma per LoRA module (arXiv 2509.18093), where s is the
activation norm ||B A x|| (or its gain ||B A x|| / ||A x||, seqr.core.routing.gain) and mu,
sigma are statistics of s. Several parties measure s and must get the same numbers: a node's
calibration (seqr.node.calibrate: the statistics it claims), the server's plausibility probe
(seqr.operator.probe: the same adapter on public text), a router's reference and query
statistics and its per-sequence decision (seqr.core.model_routing). All of them compute it
here, with the same projection, the same float32 arithmetic and the same token rule.

Score: for a module with the shared A and an adapter's B, at a token whose module input is x,
h = A x is computed once (``project``; float32 unless A is float64) and every adapter's norm
is ||B h|| = ||R h|| through SEQR's Gram matrix (SeqrRouter), so a B whose B^T B overflows in
float32, the dtype routers compute in, shows wherever it is measured. The gain scales h by
1 / ||h|| first (``token_scores``).

Token rule (``measured_tokens``; one rule for statistics and for per-sequence routing):

1. padding (attention mask 0) never counts;
2. the first token of every sequence does not count when the sequence has others. Causal
   language models park "massive activations" on the first token, whatever it is (Sun et al.,
   "Massive Activations in Large Language Models", arXiv 2402.17762; the attention sink of
   Xiao et al., arXiv 2309.17453). Measured on SmolLM2-135M: the input of layer 11's down_proj
   has ||A x|| 530 times the median of the other tokens there (probe text; 500 times on the
   licences domain), so one token in 128 held 99.99% of that module's norm variance (norm std
   16.4 with it, 0.088 without). It carries no information about the domain of the text;
3. for gains, a token whose ||A x|| <= ``min_projection_ratio`` ||x|| does not count: there
   the direction of h, and so the gain, is rounding noise (a float32 dot product of length
   d_in errs by up to d_in 2^-24 ||a|| ||x||, Higham, "Accuracy and Stability of Numerical
   Algorithms", 2002, sec. 3.1; 1e-4 covers d_in <= 1678 with rows ||a|| <= 1, as the shared
   A has). Real SmolLM2 tokens sit at 4.8e-3 ||x|| and above (median about 0.05);
4. a sequence the rule would leave without any token counts all its unpadded tokens.

Per-token routing (seqr.core.model_routing.per_token) still gives every token an update:
the rule decides what is measured and aggregated, not which tokens get an adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seqr.core.errors import ConfigError, ShapeError
from seqr.core.routing import Router, SeqrRouter
from seqr.core.routing.base import finite_or_lowest
from seqr.core.routing.gain import check_score_kind, input_energy

__all__ = [
    "TOKEN_RULE",
    "TokenRule",
    "adapter_router",
    "measured_tokens",
    "project",
    "token_scores",
]


@dataclass(frozen=True)
class TokenRule:
    """Which tokens a statistic or a per-sequence decision counts (module docstring)."""

    skip_first: bool = True  # the first token of each sequence (when it has others)
    min_projection_ratio: float = 1e-4  # gains: count a token only if ||A x|| > this * ||x||

    def __post_init__(self) -> None:
        if not isinstance(self.skip_first, bool):
            raise ConfigError(f"TokenRule.skip_first = {self.skip_first!r} must be a bool")
        ratio = self.min_projection_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise ConfigError(f"TokenRule.min_projection_ratio = {ratio!r} must be a number")
        if not (math.isfinite(ratio) and 0 <= ratio < 1):
            raise ConfigError(f"TokenRule.min_projection_ratio = {ratio!r} must be in [0, 1)")


TOKEN_RULE = TokenRule()  # the federation's one rule: every party measures with it


def project(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h = A x for every row of x (..., d_in) with A (r, d_in): (..., r), in A's dtype."""
    if x.shape[-1] != a.shape[-1]:
        raise ShapeError(f"inputs have d_in = {x.shape[-1]} but A is {tuple(a.shape)}")
    return x.to(a.dtype) @ a.T


def measured_tokens(
    x: torch.Tensor,
    h: torch.Tensor,
    attention_mask: torch.Tensor | None,
    score: str,
    rule: TokenRule = TOKEN_RULE,
) -> torch.Tensor:
    """(B, T) bool: the tokens whose scores count, for module inputs x (B, T, d_in) with
    h = A x (B, T, r) and attention_mask (B, T) of 0 / 1 (None: no padding)."""
    check_score_kind(score, "score")
    if x.ndim != 3 or h.shape[:-1] != x.shape[:-1]:
        raise ShapeError(
            f"module inputs must be (batch, tokens, d_in) with h = A x alike; got x "
            f"{tuple(x.shape)} and h {tuple(h.shape)}"
        )
    lead = tuple(x.shape[:-1])
    if attention_mask is None:
        valid = torch.ones(lead, dtype=torch.bool, device=x.device)
    elif tuple(attention_mask.shape) != lead:
        raise ShapeError(f"attention_mask is {tuple(attention_mask.shape)}; inputs are {lead}")
    else:
        valid = attention_mask.to(device=x.device, dtype=torch.bool)
    keep = valid.clone()
    if rule.skip_first:  # rule 2: the first unpadded token (left padding: not position 0)
        first = valid.to(torch.int8).argmax(dim=1)
        rows = torch.nonzero(valid.sum(dim=1) > 1).flatten()
        keep[rows, first[rows]] = False
    if score == "gain":  # rule 3, strictly above: an all-zero input never counts
        x_norm = torch.linalg.vector_norm(x.to(h.dtype), dim=-1)
        keep &= torch.linalg.vector_norm(h, dim=-1) > rule.min_projection_ratio * x_norm
    empty = ~keep.any(dim=1)  # rule 4
    if empty.any():
        keep[empty] = valid[empty]
    return keep


def adapter_router(b: torch.Tensor) -> SeqrRouter:
    """A SEQR router over one adapter's B (d_out, r), scoring from h = A x: SEQR never uses A
    once h is known, so the identity stands in for it (d_in = r)."""
    r = int(b.shape[-1])
    return SeqrRouter(torch.eye(r, dtype=torch.float32, device=b.device), b)


def token_scores(
    router: Router, h: torch.Tensor, score: str, x: torch.Tensor | None = None
) -> torch.Tensor:
    """(M, N) scores of the router's N adapters at M tokens with h = A x (M, r): norms or
    gains, z-scored when the router holds statistics; -inf where not finite in the router's
    compute dtype. SEQR scores from h alone; other routers (baselines) need x (M, d_in)."""
    check_score_kind(score, "score")
    if score == "gain":  # x and h scaled by 1 / ||h||, which every router's norm follows
        energy = input_energy(h)
        h = h / energy
        x = None if x is None else x / energy.to(x.dtype)
    if isinstance(router, SeqrRouter):
        out = router.scores_from_projection(h)
    elif x is None:
        raise ShapeError(f"{type(router).__name__} scores module inputs x; pass them")
    else:
        out = router.scores(x)
    return finite_or_lowest(out.to(h.dtype))
