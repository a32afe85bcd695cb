"""Soft token votes (seqr.core.model_routing.soft_votes) of the validation rows: their pool.

Soft votes are a non-linear function of each token's decision score under the query
statistics, which exist only once the shared pass (eval_scores.py) has seen every validation
row. The shared pass scores the test rows' votes itself (SEQR's and brute force's); the
validation rows' votes, which standardise every adapter's share, need this one more
base-model pass over them with SEQR's hooks only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from seqr.core.model_routing import build_routed_modules
from seqr.core.model_routing.soft_votes import TokenDecisions
from seqr.core.stats import ScoreKind
from seqr.sim.eval_scores import Calibration
from seqr.sim.lm_loss import BASE, hidden_states, merged_adapter


@torch.no_grad()
def pool_votes(
    peft_model: Any,
    adapters: Sequence[str],
    calibration: Calibration,
    score: ScoreKind,
    batches: Sequence[torch.Tensor],
    temperature: float,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(S, N) vote shares of batches of token ids (no padding) under ``calibration``."""
    modules = build_routed_modules(peft_model, adapters, score=score)
    holder = [TokenDecisions()]  # the current batch's, read by every hook

    def hook_for(index: int, module: Any) -> Any:
        mean, std = calibration.mean[index].float(), calibration.std[index].float()

        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = (args[0] if args else kwargs["x"]).to(module.A.dtype)
            flat = x.reshape(-1, x.shape[-1])
            h = module.project(flat)
            keep = module.measured(x, h.reshape(*x.shape[:-1], -1), None)
            raw = module.scores(flat, h).float()  # the one measurement, raw (no statistics)
            holder[0].add(((raw - mean) / std).reshape(*x.shape[:-1], -1), keep)

        return hook

    handles = [
        m.layer.register_forward_hook(hook_for(i, m), with_kwargs=True)
        for i, m in enumerate(modules)
    ]
    out = []
    try:
        with merged_adapter(peft_model, BASE):
            for input_ids in batches:
                holder[0] = TokenDecisions()
                hidden_states(peft_model, input_ids)
                out.append(holder[0].votes(temperature))
                if progress is not None:
                    progress(int(input_ids.shape[0]))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)
