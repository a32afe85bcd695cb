"""peft's own ARROW (``create_arrow_model``) over the same exports: the evaluation's outside
anchor beside our ArrowRouter (the ARROW paper's prototypes, computed by peft's own code)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def peft_arrow_model(make_base: Callable[[], Any], export_paths: list[str]) -> Any:
    """peft's own ARROW (create_arrow_model) over the same exports: the outside anchor."""
    from peft import ArrowConfig, create_arrow_model

    # peft's default top_k = 3 fails (torch.topk) on a library of 2 adapters.
    config = ArrowConfig(top_k=min(3, len(export_paths)), rng_seed=0)
    model = create_arrow_model(make_base(), export_paths, config)
    model.eval()
    with torch.no_grad():  # prototypes are built lazily on the first forward
        model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    return model


def peft_arrow_scorers(arrow_model: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Module name -> abs(x . prototype) with peft's own power-iteration prototypes."""
    scorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name, module in arrow_model.base_model.model.named_modules():
        arrow = getattr(module, "lora_arrow", None)
        if arrow is not None and "arrow_router" in arrow:
            protos = arrow["arrow_router"].prototypes.detach().float()
            scorers[name] = functools.partial(_abs_projection, protos)
    return scorers


def _abs_projection(prototypes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x.float() @ prototypes.T).abs()
