"""Per-token, per-module routing inside peft's lora.Linear (SpectR / LAG granularity).

SpectR (arXiv 2504.03454) and LAG (arXiv 2507.05346) route every token in every LoRA module
on that module's own input. With SEQR's shared A (arXiv 2509.18093) one projection h = A x
serves both the routing (||R_i h||) and the update: delta = s * sum_k w_k B_{i_k} h.

Mechanics, using only peft's public forward semantics: a forward pre-hook passes
``adapter_names=["__base__"] * batch`` to the layer, so peft adds no adapter of its own (its
mixed-batch path computes the base output only), and a forward hook adds the routed delta.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from seqr.core.errors import ShapeError
from seqr.core.model_routing.config import ModelRoutingConfig
from seqr.core.model_routing.modules import RoutedModule
from seqr.core.routing.base import best_k, finite_or_lowest


@dataclass
class ModuleRecord:
    """What one module saw and chose in the last forward (kept when config.record is set)."""

    scores: torch.Tensor  # (..., N) z-scores (or norms), leading dims as the module's input
    indices: torch.Tensor  # (..., k) chosen adapters, best first
    weights: torch.Tensor  # (..., k) their weights (sum to 1)


def topk_weights(
    scores: torch.Tensor, k: int, weighting: str = "softmax", temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights), each (M, k): the k best adapters per row and weights summing to 1
    (to 0 where no chosen adapter could be scored)."""
    n = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ShapeError(f"top_k must be an integer in [1, N = {n}] adapters, got {k!r}")
    values, indices = best_k(finite_or_lowest(scores), k)
    if weighting == "uniform":
        weights = torch.full_like(values, 1.0 / k)
    else:  # softmax over the k kept scores (LAG-style mixing); k = 1 gives weight 1
        weights = torch.softmax(values / temperature, dim=-1)
    # An adapter that cannot be scored (-inf) adds nothing, even when nothing else is left
    # (softmax of all -inf is NaN): such a row's weights are 0, not NaN.
    weights = torch.where(torch.isfinite(values), weights, torch.zeros((), dtype=weights.dtype))
    return indices, weights


def routed_delta(
    module: RoutedModule, x: torch.Tensor, config: ModelRoutingConfig
) -> tuple[torch.Tensor, ModuleRecord]:
    """s * sum_k w_k B_{i_k} (A x) for every token of x (..., d_in); (..., d_out)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    h = module.project(flat)  # (M, r), computed once
    scores = module.scores(flat, h)  # (M, N)
    indices, weights = topk_weights(scores, config.top_k, config.weighting, config.temperature)
    delta = h.new_zeros(h.shape[0], module.B.shape[1])  # (M, d_out)
    # One GEMM per adapter actually chosen, on its tokens only (as peft's mixed batch does).
    for adapter in torch.unique(indices).tolist():
        rows, slot = torch.nonzero(indices == adapter, as_tuple=True)
        coeff = weights[rows, slot].unsqueeze(-1)  # (m, 1)
        delta.index_add_(0, rows, (coeff * h[rows]) @ module.B[adapter].T)
    delta.mul_(module.scaling)
    k = config.top_k
    record = ModuleRecord(
        scores=scores.reshape(*lead, -1),
        indices=indices.reshape(*lead, k),
        weights=weights.reshape(*lead, k),
    )
    return delta.reshape(*lead, -1), record


@contextmanager
def per_token_routing(
    modules: Sequence[RoutedModule],
    config: ModelRoutingConfig,
    records: dict[str, ModuleRecord] | None = None,
) -> Iterator[None]:
    """Within the block, every module adds its own routed delta instead of peft's adapters."""

    def base_only(
        layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = args[0] if args else kwargs["x"]
        kwargs["adapter_names"] = ["__base__"] * len(x)
        return args, kwargs

    def add_delta(module: RoutedModule) -> Any:
        def hook(
            layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
        ) -> torch.Tensor:
            x = args[0] if args else kwargs["x"]
            delta, record = routed_delta(module, x, config)
            if records is not None:
                records[module.name] = record
            return output + delta.to(output.dtype)

        return hook

    handles = []
    try:
        for module in modules:
            handles.append(module.layer.register_forward_pre_hook(base_only, with_kwargs=True))
            handles.append(module.layer.register_forward_hook(add_delta(module), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
