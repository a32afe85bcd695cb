"""How a RegistryRouter routes and batches, and whose statistics it z-scores with.

Calibrations (seqr/consumer/calibration.py): "own" (each adapter's signed statistics),
"reference" (measured by the router on public text it trusts), "blend" (both z-scores
averaged) and "queries" (sequence-level statistics over unlabeled examples of the router's
own inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from seqr.core.device import check_device
from seqr.core.errors import ConfigError
from seqr.core.model_routing import ModelRoutingConfig
from seqr.core.model_routing.config import FIRST_PASS_DTYPES
from seqr.core.model_routing.loss_check import LOSS_CHECK_MARGIN

Mode = Literal["per_sequence", "per_token"]
Calibration = Literal["own", "reference", "blend", "queries"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
REFERENCE_SEQ_LEN = 128  # tokens per reference chunk, as the federation calibrates
# `--routing-pass` of seqr serve and seqr route: "float32" is the base model itself (exact);
# "auto" picks bfloat16 where the CPU multiplies it natively, float32 elsewhere.
RoutingPass = Literal["auto", "float32", "bfloat16", "float16"]
ROUTING_PASSES: tuple[str, ...] = get_args(RoutingPass)


def native_bf16() -> bool:
    """Whether this CPU has native bf16 matrix units (AMX or AVX512-BF16). Elsewhere torch
    emulates bf16 and a bf16 routing pass is slower than fp32. torch's own CPU probes, which
    are private: a torch without them reads as no."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def routing_pass_dtype(choice: str, device: str) -> str | None:
    """EngineConfig.first_pass_dtype for a --routing-pass choice. "auto": bfloat16 on a CPU
    with native bf16 (docs/RESULTS.md: auto stays within 10% of a named adapter at 8 and 32
    clients there, with the same routing accuracy; the fp32 pass does not), float32 elsewhere."""
    if choice not in ROUTING_PASSES:
        raise ConfigError(f"routing pass {choice!r} must be one of {', '.join(ROUTING_PASSES)}")
    if choice == "auto":
        return "bfloat16" if device == "cpu" and native_bf16() else None
    return None if choice == "float32" else choice


@dataclass(frozen=True)
class RouterConfig:
    """How a RegistryRouter routes and batches (validated on construction)."""

    mode: Mode = "per_sequence"  # one adapter per input, or per token in every LoRA module
    statistics: Literal["per_module", "pooled"] = "per_module"  # which moments z-score norms
    batch_size: int = 8  # inputs per forward pass
    max_input_tokens: int = 1024  # longer inputs keep their LAST tokens (generation continues)
    device: str = "cpu"  # torch device of the model ("cuda" on a GPU machine)
    progress: bool = False  # tqdm bar over batches
    # per_sequence: the routing pass on a copy in this dtype ("bfloat16": ~3x faster on CPUs
    # with AMX, see ModelRoutingConfig.first_pass_dtype); None runs it on the model itself.
    first_pass_dtype: str | None = None
    calibration: Calibration = "own"  # whose statistics z-score the scores (module docstring)
    reference: Path | None = None  # folder of public text files; needed unless calibration="own"
    reference_max_chunks: int = 256  # chunks of REFERENCE_SEQ_LEN tokens read from it at most
    # How token z-scores make a sequence's decision: "mean", or "soft_vote" (soft token votes
    # standardised over the queries' pool; seqr.core.model_routing.soft_votes), which needs
    # calibration "queries" and per_sequence. None: soft_vote where it can be used (ahead of
    # the mean or level in every run measured, docs/RESULTS.md "Soft token votes"), else mean.
    aggregation: Literal["mean", "soft_vote"] | None = None
    # Under soft votes: inputs whose two best adapters score closer than this go to the one
    # with the lower loss on the input (seqr.core.model_routing.loss_check); 0: no check.
    loss_check_margin: float = LOSS_CHECK_MARGIN

    def __post_init__(self) -> None:
        if self.aggregation is None:
            soft = self.calibration == "queries" and self.mode == "per_sequence"
            object.__setattr__(self, "aggregation", "soft_vote" if soft else "mean")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"RouterConfig.calibration = {self.calibration!r} must be one of {CALIBRATIONS}"
            )
        if self.calibration == "own" and self.reference is not None:
            raise ConfigError("calibration 'own' takes no reference text; add --calibration "
                              "reference|blend|queries to use --reference")  # fmt: skip
        if self.calibration != "own" and self.reference is None:
            raise ConfigError(f"calibration {self.calibration!r} needs a reference folder: "
                              "--reference DIR of text files")  # fmt: skip
        if self.aggregation not in ("mean", "soft_vote"):
            raise ConfigError(
                f"RouterConfig.aggregation = {self.aggregation!r} must be mean or soft_vote"
            )
        if self.aggregation == "soft_vote" and (
            self.calibration != "queries" or self.mode != "per_sequence"
        ):
            raise ConfigError("soft votes are standardised over the queries' pool: use them "
                              "with --calibration queries and per-sequence routing")  # fmt: skip
        gap = self.loss_check_margin
        if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not 0 <= gap < 1e6:
            raise ConfigError(
                f"RouterConfig.loss_check_margin = {gap!r} must be a number >= 0 (0: no check)"
            )
        if self.mode not in ("per_sequence", "per_token"):
            raise ConfigError(f"RouterConfig.mode = {self.mode!r} must be per_sequence/per_token")
        if self.statistics not in ("per_module", "pooled"):
            raise ConfigError(
                f"RouterConfig.statistics = {self.statistics!r} must be per_module or pooled"
            )
        limits = (("batch_size", 1, 4096), ("max_input_tokens", 1, 1 << 20),
                  ("reference_max_chunks", 2, 1 << 20))  # fmt: skip
        for name, low, high in limits:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"RouterConfig.{name} = {value!r} must be an int in [{low}, {high}]"
                )
        if self.first_pass_dtype not in (None, *FIRST_PASS_DTYPES):
            raise ConfigError(
                f"RouterConfig.first_pass_dtype = {self.first_pass_dtype!r} must be None or "
                f"one of {FIRST_PASS_DTYPES}"
            )
        check_device(self.device, "RouterConfig.device")

    def routing(self) -> ModelRoutingConfig:
        """The model-level config; per_token routing has no first pass to speed up."""
        dtype = self.first_pass_dtype if self.mode == "per_sequence" else None
        return ModelRoutingConfig(
            mode=self.mode, statistics=self.statistics, first_pass_dtype=dtype,
            aggregation=self.aggregation or "mean",  # set by __post_init__; soft: checked
            loss_check_margin=(self.loss_check_margin or None)
            if self.aggregation == "soft_vote" else None,
        )  # fmt: skip
