"""Find a peft model's LoRA modules, check that they share A, and build one router per module.

Module names are the wrapped transformers model's own (``model.layers.0.self_attn.q_proj``:
``peft_model.base_model.model.named_modules()``), the same names shared_a.py and calibration
use as ``NormStatistics.modules`` keys.

Norm convention: a router scores ||B_i A x|| with B_i = ``lora_B[i].weight`` as stored, without
peft's scaling alpha/r. Every adapter of a module must have the same scaling (checked here), so
the scaling is one positive factor s per module: argmax_i s||B_i A x|| = argmax_i ||B_i A x||,
and z-scores are unchanged as long as the statistics were measured on the same unscaled norms
(a z-score is invariant when norm, mean and std all scale by s). The scaling is applied once,
to the delta added to the module's output, exactly as peft does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqr.core.errors import ConfigError, SeqrError, ShapeError, ValueCheckError
from seqr.core.measurement import measured_tokens, project, token_scores
from seqr.core.routing import Router, SeqrRouter
from seqr.core.routing.base import compute_dtype_for
from seqr.core.routing.gain import check_score_kind
from seqr.core.stats import NormStatistics, RunningMoments, ScoreKind

RouterFactory = Callable[..., Router]


@dataclass
class RoutedModule:
    """One peft lora.Linear with a router over the N adapters it holds."""

    name: str  # the transformers model's module name
    layer: nn.Module  # peft.tuners.lora.Linear
    layer_index: int | None  # first integer in the name: the decoder layer
    A: torch.Tensor  # (r, d_in), shared by all adapters, compute dtype
    B: torch.Tensor  # (N, d_out, r), compute dtype
    scaling: float  # peft's alpha / r (or alpha / sqrt(r)), the same for every adapter
    router: Router
    score: ScoreKind = "norm"  # "gain": norms per unit ||A x|| (seqr.core.routing.gain)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """h = A x for rows (..., d_in): computed once, used to route and to apply."""
        return project(x, self.A)  # (..., r)

    def scores(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(M, N) scores: z-scores with statistics, else norms (or gains); the one
        measurement (seqr.core.measurement.token_scores). SEQR reuses h (no extra A x)."""
        return token_scores(self.router, h, self.score, x)

    def measured(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) bool: the tokens of x (B, T, d_in) whose scores count (the token rule)."""
        return measured_tokens(x, h, mask, self.score)


def transformers_model(peft_model: Any) -> nn.Module:
    """The wrapped transformers model of a PeftModel (or of a LoraModel)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(peft_model, PeftModel):
        peft_model = peft_model.base_model
    if not isinstance(peft_model, LoraModel):
        raise ConfigError(
            f"expected a peft PeftModel holding LoRA adapters, got {type(peft_model).__name__}; "
            "wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    model: nn.Module = peft_model.model
    return model


def _layer_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _weight(layer: Any, kind: str, adapter: str) -> torch.Tensor:
    """``layer.lora_A[adapter].weight`` (kind "lora_A") or lora_B's, detached."""
    weight: torch.Tensor = getattr(layer, kind)[adapter].weight
    return weight.detach()


def _check_layer(name: str, layer: Any, adapters: Sequence[str]) -> float:
    """Shared A, one scaling, plain LoRA, not merged; returns the scaling."""
    from peft.tuners.lora import Linear

    is_linear = isinstance(layer, Linear)  # a bool: keeps ``layer`` typed Any for mypy
    if not is_linear:
        raise ConfigError(f"module {name} is a {type(layer).__name__}; only lora.Linear is routed")
    missing = [a for a in adapters if a not in layer.lora_A]
    if missing:
        raise ValueCheckError(
            f"module {name} has no LoRA for adapters {missing}; every adapter must target the "
            "same modules (the federation's lora_target_modules)"
        )
    if layer.merged:
        raise ConfigError(f"module {name} has merged adapters; call unmerge_adapter() first")
    for a in adapters:
        if a in layer.lora_variant or layer.lora_bias.get(a, False):
            raise ConfigError(
                f"adapter {a!r} in module {name} is not plain LoRA (DoRA, lora_bias or another "
                "variant); SEQR routes plain B A adapters only"
            )
    first = _weight(layer, "lora_A", adapters[0])
    for a in adapters[1:]:
        other = _weight(layer, "lora_A", a)
        if other.shape != first.shape:
            raise ShapeError(
                f"module {name}: lora_A of {a!r} is {tuple(other.shape)} but lora_A of "
                f"{adapters[0]!r} is {tuple(first.shape)}; SEQR needs one shared A per module"
            )
        if not torch.equal(other, first):
            raise ValueCheckError(
                f"module {name}: lora_A of {a!r} differs from lora_A of {adapters[0]!r}; SEQR "
                "needs one shared frozen A per module (install it with shared_a.install_shared_a)"
            )
    scalings = {a: float(layer.scaling[a]) for a in adapters}
    if len(set(scalings.values())) != 1:
        raise ValueCheckError(
            f"module {name}: adapters have different LoRA scalings {scalings}; routing needs "
            "one lora_alpha and r for all adapters (the federation fixes both)"
        )
    return scalings[adapters[0]]


def _moments(
    stats: Mapping[str, NormStatistics], adapter: str, module: str, pooled: bool
) -> RunningMoments:
    if adapter not in stats:
        raise ValueCheckError(
            f"no statistics for adapter {adapter!r}; give statistics for every adapter or none"
        )
    if pooled:
        moments = stats[adapter].pooled()
    elif module in stats[adapter].modules:
        moments = stats[adapter].modules[module]
    else:
        known = sorted(stats[adapter].modules)[:3]
        raise ValueCheckError(
            f"statistics of adapter {adapter!r} have no module {module!r} (keys are the "
            f"transformers model's module names, e.g. {known}); recalibrate on every LoRA module"
        )
    if moments.n != 1:
        raise ShapeError(
            f"statistics of adapter {adapter!r}, module {module!r} hold {moments.n} series; "
            "an adapter's own statistics hold one (n = 1)"
        )
    return moments


def _score_kind(
    stats: Mapping[str, NormStatistics] | None, adapters: Sequence[str], score: ScoreKind | None
) -> ScoreKind:
    if score is not None:
        check_score_kind(score, "score")
    if stats is None:
        return score or "norm"
    kinds = {a: stats[a].score for a in adapters if a in stats}
    wanted: ScoreKind = score if score is not None else next(iter(kinds.values()), "norm")
    wrong = {a: k for a, k in kinds.items() if k != wanted}
    if wrong:
        raise ValueCheckError(
            f"statistics of {sorted(wrong)} measure {sorted(set(wrong.values()))} but routing "
            f"z-scores {wanted!r}; every adapter's statistics must measure the same score "
            "(the federation's calib_score)"
        )
    return wanted


def build_routed_modules(
    peft_model: Any,
    adapters: Sequence[str],
    *,
    stats: Mapping[str, NormStatistics] | None = None,
    pooled: bool = False,
    router_factory: RouterFactory = SeqrRouter,
    score: ScoreKind | None = None,
) -> list[RoutedModule]:
    """Every lora.Linear holding the adapters, each with its router (in ``adapters`` order).

    score: "norm" or "gain"; None takes the kind the statistics were measured as (raw norms
    without statistics). Statistics of another kind than ``score`` are refused.
    """
    from peft.tuners.lora import LoraLayer

    if not adapters or len(set(adapters)) != len(adapters):
        raise ConfigError(f"adapters must be a non-empty list of unique names, got {adapters!r}")
    kind = _score_kind(stats, adapters, score)
    model = transformers_model(peft_model)
    routed = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not any(a in module.lora_A for a in adapters):
            continue
        layer: Any = module
        scaling = _check_layer(name, layer, adapters)
        A = _weight(layer, "lora_A", adapters[0])
        Bs = [_weight(layer, "lora_B", a) for a in adapters]
        dtype = compute_dtype_for(A.dtype, Bs[0].dtype)
        mean = std = None
        if stats is not None:
            moments = [_moments(stats, a, name, pooled) for a in adapters]
            mean = [float(m.mean[0]) for m in moments]
            std = [float(m.std[0]) for m in moments]
        try:
            router = router_factory(A, Bs, mean=mean, std=std, names=list(adapters))
        except SeqrError as exc:
            raise type(exc)(f"module {name}: {exc}") from exc
        routed.append(
            RoutedModule(
                name=name,
                layer=layer,
                layer_index=_layer_index(name),
                A=A.to(dtype),
                B=torch.stack([b.to(dtype) for b in Bs]),
                scaling=scaling,
                router=router,
                score=kind,
            )
        )
    if not routed:
        raise ConfigError(f"the model has no LoRA module holding adapters {list(adapters)}")
    return routed
