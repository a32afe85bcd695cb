"""How a routed model picks adapters: one validated dataclass (peft LoraConfig style).

Two granularities (arXiv 2509.18093, routing granularity): ``per_token`` routes every token in every
LoRA module on that module's own input, as SpectR (arXiv 2504.03454) and LAG (arXiv 2507.05346)
do; ``per_sequence`` aggregates module scores over layers and tokens into one adapter per
sequence and runs the batch with peft's mixed-adapter inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from seqr.core.errors import ConfigError
from seqr.core.model_routing.soft_votes import SOFT_VOTE_TEMPERATURE

Mode = Literal["per_token", "per_sequence"]
Weighting = Literal["softmax", "uniform"]
Aggregation = Literal["mean", "vote", "soft_vote"]
StatisticsScope = Literal["per_module", "pooled"]

_MODES = ("per_token", "per_sequence")
_WEIGHTINGS = ("softmax", "uniform")
_AGGREGATIONS = ("mean", "vote", "soft_vote")
_SCOPES = ("per_module", "pooled")
FIRST_PASS_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelRoutingConfig:
    """Routing inside a model.

    mode: ``per_token`` (each module routes each token) or ``per_sequence`` (one adapter per
        sequence, chosen from a first pass on the base model).
    top_k: adapters mixed per token (per_token only; per_sequence picks exactly one).
    weighting: how the k chosen adapters are weighted: ``softmax`` of their scores divided by
        ``temperature`` (LAG-style), or ``uniform`` (1/k each). Weights always sum to 1.
    temperature: softmax temperature (> 0); scores are z-scores when statistics are given.
    aggregation: per_sequence only. ``mean``: mean of module scores over valid (unpadded) tokens
        and modules, argmax per sequence (the best measured here: docs/ROUTING.md). ``vote``: every
        (token, module) votes for its argmax; the most votes wins. ``soft_vote``: each measured
        token's decision scores (the mean over modules of its z-scores) become a distribution
        softmax(d / vote_temperature) over the adapters and the sequence takes the mean share
        (soft_votes.py), standardised per adapter when RoutedModel has ``vote_stats``.
    vote_temperature: the softmax temperature of ``soft_vote``, in z-score units (> 0).
    statistics: which calibration moments turn norms into z-scores: each module's own
        (``per_module``) or all modules of the adapter pooled (``pooled``). Whether per-module or
        pooled is better is not fixed by the paper: both are measurable.
    layers: per_sequence only: indices of the decoder layers whose modules are scored (e.g. the
        upper half); None scores every module. The chosen adapter still runs in every module.
    first_pass_dtype: per_sequence only: run the first (routing) pass on a copy of the model
        in this dtype, e.g. ``"bfloat16"``; None runs it on the model itself. The decision is
        still exact SEQR over that pass's activations (brute force on the same pass agrees),
        but bf16 activations may flip near-ties. Costs one copy of the weights in that dtype;
        on CPUs with bf16 matrix units (AMX) the pass runs ~3x faster, which keeps routed
        generation within a few percent of generating with the chosen adapter alone.
    record: keep the last forward's per-module scores and choices (``RoutedModel.records``).
    """

    mode: Mode = "per_sequence"
    top_k: int = 1
    weighting: Weighting = "softmax"
    temperature: float = 1.0
    aggregation: Aggregation = "mean"
    vote_temperature: float = SOFT_VOTE_TEMPERATURE
    statistics: StatisticsScope = "per_module"
    layers: tuple[int, ...] | None = None
    first_pass_dtype: str | None = None
    record: bool = False
    # soft_vote only: sequences whose two best adapters score closer than this (standardised
    # units) go to the one with the lower loss on the sequence (loss_check.py); None: no check
    loss_check_margin: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.mode == "per_sequence" and self.top_k != 1:
            raise ConfigError(
                f"top_k is {self.top_k} but per_sequence routing runs one adapter per sequence "
                "(peft adapter_names); use top_k=1 or mode='per_token'"
            )
        if self.weighting not in _WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {_WEIGHTINGS}, got {self.weighting!r}")
        for name in ("temperature", "vote_temperature"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if self.aggregation not in _AGGREGATIONS:
            raise ConfigError(
                f"aggregation must be one of {_AGGREGATIONS}, got {self.aggregation!r}"
            )
        if self.statistics not in _SCOPES:
            raise ConfigError(f"statistics must be one of {_SCOPES}, got {self.statistics!r}")
        if self.first_pass_dtype is not None:
            if self.first_pass_dtype not in FIRST_PASS_DTYPES:
                raise ConfigError(
                    f"first_pass_dtype must be None or one of {FIRST_PASS_DTYPES}, "
                    f"got {self.first_pass_dtype!r}"
                )
            if self.mode != "per_sequence":
                raise ConfigError("first_pass_dtype applies to per_sequence routing only")
        if not isinstance(self.record, bool):
            raise ConfigError(f"record must be a bool, got {self.record!r}")
        gap = self.loss_check_margin
        if gap is not None:
            if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 <= gap < 1e6:
                raise ConfigError(f"loss_check_margin must be None or a number >= 0, got {gap!r}")
            if self.aggregation != "soft_vote" or self.mode != "per_sequence":
                raise ConfigError("the loss check decides between soft votes' two best "
                                  "adapters: use it with per_sequence soft_vote")  # fmt: skip
        self._check_layers()

    def _check_layers(self) -> None:
        if self.layers is None:
            return
        if self.mode != "per_sequence":
            raise ConfigError(
                "layers selects which modules vote in per_sequence routing; in per_token mode "
                f"every module routes itself. Got layers={self.layers!r} with mode={self.mode!r}"
            )
        layers = tuple(self.layers)
        if not layers:
            raise ConfigError("layers is empty; give at least one layer index or None for all")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ConfigError(f"layers must hold integers >= 0, got {layer!r}")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"layers holds duplicates: {layers!r}")
        object.__setattr__(self, "layers", layers)
