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

from seqr.core.errors import ConfigError
from seqr.core.model_routing import ModelRoutingConfig
from seqr.core.model_routing.config import FIRST_PASS_DTYPES

Mode = Literal["per_sequence", "per_token"]
Calibration = Literal["own", "reference", "blend", "queries"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
REFERENCE_SEQ_LEN = 128  # tokens per reference chunk, as the federation calibrates


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

    def __post_init__(self) -> None:
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
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"RouterConfig.device = {self.device!r} is not a torch device"
            ) from None

    def routing(self) -> ModelRoutingConfig:
        """The model-level config; per_token routing has no first pass to speed up."""
        dtype = self.first_pass_dtype if self.mode == "per_sequence" else None
        return ModelRoutingConfig(
            mode=self.mode, statistics=self.statistics, first_pass_dtype=dtype
        )
