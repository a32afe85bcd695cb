"""First pass of per-sequence routing: every module's token scores on the base model.

The scores are taken on each LoRA module's input while the model runs with no adapter
(``adapter_names=["__base__"] * batch``, peft's mixed-batch placeholder for the base model), the
inputs on which calibration measures its statistics (federation ``calib_lora_active = False``).
Hooks reduce each module's (B, T, N) scores to per-sequence sums at once, so memory stays
O(modules B N) unless the full scores are recorded. Only the tokens the measurement's token
rule counts enter the sums (seqr.core.measurement: no padding, not the first token, no gain
at a near-zero ||A x||), as in the statistics they are z-scored with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from seqr.core.errors import ConfigError
from seqr.core.model_routing.config import ModelRoutingConfig
from seqr.core.model_routing.modules import RoutedModule
from seqr.core.model_routing.per_token import ModuleRecord
from seqr.core.model_routing.soft_votes import TokenDecisions


@dataclass
class ScoreSums:
    """Per-sequence scores over measured tokens, accumulated over modules."""

    score_sum: torch.Tensor | None = None  # (B, N): sum over modules of the token-mean score
    vote_sum: torch.Tensor | None = None  # (B, N): per-(token, module) argmax counts
    votes_cast: torch.Tensor | None = None  # (B,): (token, module) pairs that voted
    modules_seen: list[str] = field(default_factory=list)
    records: dict[str, ModuleRecord] = field(default_factory=dict)
    # Soft votes need each token's decision (the mean over the modules measuring it), kept
    # only when asked.
    per_token: bool = False
    tokens: TokenDecisions = field(default_factory=TokenDecisions)

    def add(self, name: str, scores: torch.Tensor, mask: torch.Tensor) -> None:
        """scores (B, T, N); mask (B, T) in {0, 1}: the module's measured tokens (padding
        and the tokens the token rule leaves out add nothing). Each module adds its mean over
        those tokens, so every module weighs the same, as in the statistics (a module's
        sequence mean) and the evaluation. A -inf score (an adapter that cannot be scored,
        routing.base.finite_or_lowest) makes that adapter's sum -inf; on an unmeasured token
        it is dropped (where, not 0 * -inf = NaN)."""
        valid = mask.to(torch.bool).unsqueeze(-1)  # (B, T, 1)
        weights = valid.to(scores.dtype)
        summed = torch.where(valid, scores, torch.zeros((), dtype=scores.dtype)).sum(dim=1)
        mean = summed / weights.sum(dim=1).clamp_min(1)  # (B, N); >= 1 token: rule 4
        votes = torch.nn.functional.one_hot(scores.argmax(dim=-1), scores.shape[-1])
        voted = (votes.to(scores.dtype) * weights).sum(dim=1)  # (B, N)
        self.score_sum = mean if self.score_sum is None else self.score_sum + mean
        self.vote_sum = voted if self.vote_sum is None else self.vote_sum + voted
        cast = weights.sum(dim=(1, 2))  # (B,)
        if self.per_token:
            self.tokens.add(scores, mask)
        self.votes_cast = cast if self.votes_cast is None else self.votes_cast + cast
        self.modules_seen.append(name)


def scored_modules(
    modules: Sequence[RoutedModule], config: ModelRoutingConfig
) -> list[RoutedModule]:
    """The modules whose scores count (config.layers), in model order."""
    if config.layers is None:
        return list(modules)
    present = {m.layer_index for m in modules}
    missing = sorted(set(config.layers) - present)
    if missing:
        known = sorted(i for i in present if i is not None)
        raise ConfigError(f"layers {missing} hold no routed LoRA module; the model has {known}")
    return [m for m in modules if m.layer_index in config.layers]


def base_pass(peft_model: Any) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The first pass on the peft model itself, every row on the base model: peft's
    mixed-batch placeholder ``"__base__"`` switches the adapters off for this call only."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return peft_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            adapter_names=["__base__"] * int(input_ids.shape[0]),
            logits_to_keep=1,  # only the module inputs are needed, not the vocabulary logits
        )

    return run


@torch.no_grad()
def collect_scores(
    run_base: Callable[[torch.Tensor, torch.Tensor], Any],
    modules: Sequence[RoutedModule],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    record: bool = False,
    per_token: bool = False,
) -> ScoreSums:
    """Run the base model once (``run_base(input_ids, attention_mask)``, e.g. base_pass)
    and sum every module's token scores per sequence (``per_token``: per token too)."""
    sums = ScoreSums(per_token=per_token)

    def hook_for(module: RoutedModule) -> Any:
        def hook(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs["x"]  # (B, T, d_in)
            x = x.to(module.A.dtype)  # a bf16 pass: score in fp32
            h = module.project(x)  # (B, T, r)
            flat = x.reshape(-1, x.shape[-1])
            scores = module.scores(flat, h.reshape(-1, h.shape[-1])).reshape(*x.shape[:-1], -1)
            sums.add(module.name, scores, module.measured(x, h, attention_mask.to(x.device)))
            if record:
                top = scores.argmax(dim=-1, keepdim=True)
                sums.records[module.name] = ModuleRecord(
                    scores, top, torch.ones_like(scores[..., :1])
                )

        return hook

    handles = [m.layer.register_forward_hook(hook_for(m), with_kwargs=True) for m in modules]
    try:
        run_base(input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return sums
