"""Statistics against a shared public reference corpus, measured by whoever routes.

SEQR z-scores each adapter with the mean and std of its norms on its own training data (arXiv
2509.18093). Two weaknesses show up in practice: an input domain that excites every adapter's
norms (or one adapter's, on its own data, less) shifts the z-scores of all foreign inputs, and
the statistics are claimed by the adapter's author (a routing-hijack surface, SECURITY.md).
Measuring every adapter's norms on the SAME public reference text removes both: the z-score
then says how much more this input excites adapter i than generic text does, and no one but
the router supplies the numbers. The norm convention is calibration's (unscaled ||B A x|| on
the base model's module inputs), so the result plugs into RoutedModel(stats=...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from seqr_core.errors import DataError
from seqr_core.model_routing.modules import RoutedModule, build_routed_modules
from seqr_core.stats import NormStatistics, RunningMoments


@torch.no_grad()
def reference_statistics(
    peft_model: Any,
    adapters: Sequence[str],
    batches: Iterable[torch.Tensor],
    *,
    score: str = "gain",
) -> dict[str, NormStatistics]:
    """Per-module token statistics of every adapter's ``score`` ("gain" or "norm", as the
    federation's calib_score) on reference batches of token ids."""
    modules = build_routed_modules(peft_model, adapters, score=score)  # no statistics: raw
    moments = {m.name: RunningMoments(len(adapters)) for m in modules}

    def hook_for(module: RoutedModule) -> Any:
        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["x"]
            flat = x.reshape(-1, x.shape[-1]).to(module.A.dtype)
            moments[module.name].update(module.scores(flat, module.project(flat)))  # (T, N)

        return hook

    handles = [m.layer.register_forward_hook(hook_for(m), with_kwargs=True) for m in modules]
    seen = 0
    try:
        for input_ids in batches:
            peft_model(
                input_ids=input_ids,
                adapter_names=["__base__"] * int(input_ids.shape[0]),
                logits_to_keep=1,
            )
            seen += int(input_ids.numel())
    finally:
        for handle in handles:
            handle.remove()
    if seen < 2:
        raise DataError("the reference corpus gave fewer than 2 tokens; give more public text")
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
