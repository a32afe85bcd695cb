"""Every routing method's scores from ONE base-model pass per batch.

Per-sequence routing needs only each module's input x on the base model (adapters off), so
a single forward with hooks feeds SEQR, SpectR, ARROW and brute force alike; each method is
timed on its own scoring work. Per sequence we keep the token-mean score of every module
(B, M, N), which lets aggregation settings be chosen on validation data afterwards, and per
token the module-mean score (B, T, N) for per-token routing accuracy.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from seqr.core.model_routing import RoutedModule

# method name -> the routed modules of that method (same layers, different routers)
MethodModules = Mapping[str, Sequence[RoutedModule]]
# extra scorers on raw module inputs: method -> (module name -> (x (M, d_in) -> (M, N)))
ExtraScorers = Mapping[str, Mapping[str, Callable[[torch.Tensor], torch.Tensor]]]


@dataclass
class MethodScores:
    module_means: list[torch.Tensor] = field(default_factory=list)  # batches of (B, M, N)
    token_means: list[torch.Tensor] = field(default_factory=list)  # batches of (B, T, N)
    seconds: float = 0.0  # time spent scoring (the routing cost beyond the base forward)

    def sequence_modules(self) -> torch.Tensor:
        """(S, M, N): per sequence, the token-mean score of every module."""
        return torch.cat(self.module_means)


@torch.no_grad()
def collect_method_scores(
    peft_model: Any,
    methods: MethodModules,
    batches: Sequence[torch.Tensor],
    *,
    extra: ExtraScorers | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, MethodScores]:
    """Run the base model once per batch of (B, T) token ids (no padding) and score all methods."""
    module_names = [m.name for m in next(iter(methods.values()))]
    layers = {m.name: m.layer for m in next(iter(methods.values()))}
    by_method = {name: {m.name: m for m in mods} for name, mods in methods.items()}
    out = {name: MethodScores() for name in [*methods, *(extra or {})]}
    current: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # method -> module -> (B,T,N)

    def hook_for(module_name: str) -> Any:
        def hook(layer: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["x"]
            flat = x.reshape(-1, x.shape[-1])
            for method, modules in by_method.items():
                start = time.perf_counter()
                routed = modules[module_name]
                scores = routed.scores(flat, routed.project(flat))
                out[method].seconds += time.perf_counter() - start
                current[method][module_name] = scores.reshape(*x.shape[:-1], -1).float()
            for method, scorers in (extra or {}).items():
                start = time.perf_counter()
                scores = scorers[module_name](flat)
                out[method].seconds += time.perf_counter() - start
                current[method][module_name] = scores.reshape(*x.shape[:-1], -1).float()

        return hook

    handles = [
        layers[name].register_forward_hook(hook_for(name), with_kwargs=True)
        for name in module_names
    ]
    try:
        for input_ids in batches:
            current.clear()
            peft_model(
                input_ids=input_ids,
                adapter_names=["__base__"] * int(input_ids.shape[0]),
                logits_to_keep=1,
            )
            for method, per_module in current.items():
                stacked = torch.stack([per_module[n] for n in module_names], dim=1)  # (B,M,T,N)
                out[method].module_means.append(stacked.mean(dim=2))
                out[method].token_means.append(stacked.mean(dim=1))
            if progress is not None:
                progress(int(input_ids.shape[0]))
    finally:
        for handle in handles:
            handle.remove()
    return out
