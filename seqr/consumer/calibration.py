"""The statistics a RegistryRouter z-scores with, for its RouterConfig.calibration.

"reference" and "blend" measure every adapter's token statistics on a folder of public text
the router trusts; "queries" measures sequence-level statistics on a folder of unlabeled
examples of its own inputs (seqr.core.model_routing.reference explains both).
"""

from __future__ import annotations

from typing import Any

import torch

from seqr.consumer.config import REFERENCE_SEQ_LEN, RouterConfig
from seqr.core.model_routing import blend_statistics, reference_statistics
from seqr.core.stats import NormStatistics


def reference_batches(config: RouterConfig, tokenizer: Any) -> list[torch.Tensor]:
    """config.reference's text as batches of REFERENCE_SEQ_LEN token ids (the pool)."""
    from seqr.core.textdata import load_text_data

    assert config.reference is not None  # RouterConfig checked it
    chunks = load_text_data(
        config.reference, tokenizer, seq_len=REFERENCE_SEQ_LEN, heldout_fraction=0.0, seed=0
    ).train[: config.reference_max_chunks]
    ids = torch.as_tensor(chunks, dtype=torch.long, device=config.device)
    return list(torch.split(ids, config.batch_size))


def calibrated_statistics(
    peft_model: Any,
    own: dict[str, NormStatistics],
    config: RouterConfig,
    batches: list[torch.Tensor] | None,
) -> dict[str, NormStatistics]:
    """``own`` for calibration "own"; else statistics measured here on ``batches`` of
    config.reference (reference_batches). Adapters that cannot be scored on that text are
    missing from the result (logged)."""
    if config.calibration == "own":
        return own
    assert batches is not None
    measured = reference_statistics(
        peft_model,
        list(own),
        batches,
        score=next(iter(own.values())).score,
        per_sequence=config.calibration == "queries",
    )
    if config.calibration != "blend":
        return measured
    return blend_statistics({name: own[name] for name in measured}, measured)
