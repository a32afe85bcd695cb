"""RoutedModel: a peft LoRA model whose adapters are chosen by SEQR (or a baseline) at run time.

The adapters are snapshotted into per-module routers when the RoutedModel is built; rebuild it
after changing adapter weights. Inference only: the model must be in eval mode (peft refuses
mixed-adapter batches in training, and LoRA dropout is not applied by the per-token path).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from seqr.core.errors import ConfigError, ShapeError
from seqr.core.model_routing.collect import base_pass, collect_scores, scored_modules
from seqr.core.model_routing.config import ModelRoutingConfig
from seqr.core.model_routing.modules import (
    RoutedModule,
    RouterFactory,
    build_routed_modules,
)
from seqr.core.model_routing.per_sequence import (
    RoutingDecision,
    check_batch,
    check_by_loss,
    decide,
)
from seqr.core.model_routing.per_token import ModuleRecord, per_token_routing
from seqr.core.model_routing.soft_votes import vote_statistics
from seqr.core.routing import SeqrRouter
from seqr.core.stats import NormStatistics


class RoutedModel:
    """RoutedModel(peft_model, config, *, adapters=None, stats=None, router_factory=SeqrRouter).

    peft_model: a PeftModel whose LoRA adapters share one lora_A per module.
    adapters: the adapter names to route over, in index order (default: all, in peft order).
    stats: adapter name -> its NormStatistics (module names as in modules.py); z-scores if given.
    router_factory: SeqrRouter, or BruteForceRouter / SpectrRouter / ArrowRouter to compare.
    vote_stats: aggregation "soft_vote" only: adapter name -> (mean, std) of its vote share
        over unlabeled inputs (``measure_vote_statistics``); the shares are standardised.
    """

    def __init__(
        self,
        peft_model: Any,
        config: ModelRoutingConfig | None = None,
        *,
        adapters: Sequence[str] | None = None,
        stats: Mapping[str, NormStatistics] | None = None,
        router_factory: RouterFactory = SeqrRouter,
        vote_stats: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self.peft_model = peft_model
        self.config = config if config is not None else ModelRoutingConfig()
        names = adapters if adapters is not None else list(getattr(peft_model, "peft_config", {}))
        self.adapters: tuple[str, ...] = tuple(names)
        self.stats = stats
        if self.config.mode == "per_token" and self.config.top_k > len(self.adapters):
            raise ShapeError(
                f"top_k is {self.config.top_k} but only {len(self.adapters)} adapters are routed"
            )
        self.modules = build_routed_modules(
            peft_model,
            self.adapters,
            stats=stats,
            pooled=self.config.statistics == "pooled",
            router_factory=router_factory,
        )
        self.scored_modules = scored_modules(self.modules, self.config)
        self.vote_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (N,) mean, std
        if vote_stats is not None:
            self.use_vote_statistics(vote_stats)
        self._pass_copy: tuple[torch.nn.Module, list[RoutedModule]] | None = None
        # Last forward's per-module scores and choices, by module name (config.record only).
        self.records: dict[str, ModuleRecord] = {}
        self.last_decision: RoutingDecision | None = None

    def use_vote_statistics(self, vote_stats: Mapping[str, tuple[float, float]]) -> None:
        """Standardise soft votes from now on with each adapter's (mean, std) vote share."""
        if self.config.aggregation != "soft_vote":
            raise ConfigError("vote_stats standardise soft votes; set aggregation='soft_vote'")
        missing = [a for a in self.adapters if a not in vote_stats]
        if missing:
            raise ConfigError(f"vote_stats lack adapters {missing}; measure them on a pool")
        mean, std = (torch.tensor([float(vote_stats[a][i]) for a in self.adapters],
                                  dtype=torch.float64) for i in (0, 1))  # fmt: skip
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ConfigError("vote_stats hold a non-finite mean or a std <= 0")
        self.vote_stats = mean, std

    def measure_vote_statistics(
        self, batches: Iterable[torch.Tensor]
    ) -> dict[str, tuple[float, float]]:
        """Each adapter's (mean, std) soft-vote share over unlabeled batches of token ids (no
        padding): the pool of query statistics (soft_votes.py). Pass it as ``vote_stats``."""
        if self.config.aggregation != "soft_vote":
            raise ConfigError("vote statistics need aggregation='soft_vote'")
        saved, self.vote_stats = self.vote_stats, None  # the raw shares
        try:
            shares = torch.cat([self.route_sequences(b).scores for b in batches])
        finally:
            self.vote_stats = saved
        mean, std = vote_statistics(shares)
        return {a: (float(mean[i]), float(std[i])) for i, a in enumerate(self.adapters)}

    # ----- routing ----------------------------------------------------------------------
    def _check_call(self, kwargs: Mapping[str, Any]) -> None:
        if self.peft_model.training:
            raise ConfigError("routing is for inference: call model.eval() first")
        if "adapter_names" in kwargs:
            raise ConfigError("adapter_names is chosen by the router; do not pass it")

    def route_sequences(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> RoutingDecision:
        """One adapter per sequence from a first pass on the base model (padding masked)."""
        self._check_call({})
        input_ids, attention_mask = check_batch(input_ids, attention_mask)
        run_base, modules = self._first_pass()
        sums = collect_scores(
            run_base, modules, input_ids, attention_mask, record=self.config.record,
            per_token=self.config.aggregation == "soft_vote",
        )  # fmt: skip
        if self.config.record:
            self.records = sums.records
        decision = decide(sums, self.config, self.adapters, self.vote_stats)
        if self.config.loss_check_margin is not None and self.vote_stats is not None:
            decision = check_by_loss(self.peft_model, input_ids, attention_mask, decision,
                                     self.config.loss_check_margin)  # fmt: skip
        self.last_decision = decision
        return decision

    def _first_pass(self) -> tuple[Any, list[RoutedModule]]:
        """How the first pass runs, and the scored modules' routers hooked into that model."""
        dtype = self.config.first_pass_dtype
        if dtype is None:
            return base_pass(self.peft_model), self.scored_modules
        if self._pass_copy is None:  # built once: a snapshot, like the routers
            # The base weights only (unload drops the LoRA layers, which are off in this pass)
            # and only the decoder stack: the vocabulary head is not needed for module inputs.
            full = copy.deepcopy(self.peft_model).unload()
            layers = dict(full.named_modules())
            modules = [dataclasses.replace(m, layer=layers[m.name]) for m in self.scored_modules]
            decoder = full.get_decoder().to(getattr(torch, dtype)).eval()
            self._pass_copy = (decoder, modules)
        decoder, modules = self._pass_copy

        def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

        return run, modules

    @contextmanager
    def per_token(self) -> Iterator[None]:
        """Within the block, calls of the peft model route every token in every module."""
        self._check_call({})
        self.records = {}
        with per_token_routing(
            self.modules, self.config, self.records if self.config.record else None
        ):
            yield

    # ----- inference --------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The peft model's output with routed adapters (``labels`` etc. pass through)."""
        self._check_call(kwargs)
        if self.config.mode == "per_token":
            with self.per_token():
                return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        decision = self.route_sequences(input_ids, attention_mask)
        return self.peft_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            adapter_names=decision.names,
            **kwargs,
        )

    __call__ = forward

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """peft's generate with routed adapters; per_sequence routes on the prompt."""
        self._check_call(kwargs)
        if self.config.mode == "per_token":
            with self.per_token():
                return self.peft_model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, **kwargs
                )
        decision = self.route_sequences(input_ids, attention_mask)
        return self.peft_model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            adapter_names=decision.names,
            **kwargs,
        )

    def __repr__(self) -> str:
        router = type(self.modules[0].router).__name__
        return (
            f"RoutedModel(mode={self.config.mode}, adapters={list(self.adapters)}, "
            f"modules={len(self.modules)}, router={router})"
        )
