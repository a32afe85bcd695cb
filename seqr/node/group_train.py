"""A client's part in a task group: local rounds of LoRA-FA on B, partial statistics at the end.

FedAvg (McMahan et al. 2017) over B only: each round the client sets B to the global B it
received, takes ``local_steps`` AdamW steps on its own data (a fresh optimizer each round:
no optimizer state crosses rounds or leaves the node), and returns its new B. A is the shared
frozen A (FFA-LoRA, Sun et al. ICLR 2024), regenerated from the public seed and never sent.
Batches continue the client's data stream across rounds: round r takes steps
(r - 1) * local_steps .. r * local_steps - 1 of seqr.node.train.batch_indices, so no round
repeats another's batches until the data is exhausted.

At the end the client measures its partial norm statistics of the FINAL group adapter on its
own data (seqr/node/calibrate.py: the same measurement as a single-client export), which the
server merges exactly (seqr.core.stats, Chan et al.) into the group adapter's statistics.

No Flower here: seqr/node/group_app.py wraps these in message handlers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqr.core.errors import ShapeError
from seqr.core.federation import FederationConfig
from seqr.core.shared_a import lora_layers
from seqr.node.calibrate import CalibrationResult, calibrate
from seqr.node.train import ADAPTER, heldout_loss, make_lora_model, train_step, trainable_b
from seqr.registry.contributions import lora_b_name

__all__ = ["GroupWork", "load_group_work", "get_b", "set_b", "train_round", "statistics"]


@dataclass
class GroupWork:
    """What a client keeps in memory between group rounds (one simulation actor, one node)."""

    peft_model: Any
    train: np.ndarray  # (N, seq_len) training chunks
    heldout: np.ndarray  # (H, seq_len) held-out chunks (the client's own split)
    fed: FederationConfig
    key: tuple[str, str, str]  # (data folder, federation fingerprint, cache folder)


_CACHE: dict[tuple[str, str, str], GroupWork] = {}


def load_group_work(
    data_dir: Path, fed: FederationConfig, cache_dir: str | None = None
) -> GroupWork:
    """Base model + LoRA-FA wrapper + tokenized data, loaded once per process and data set."""
    from seqr.node.task import load_model_and_data

    key = (str(Path(data_dir).resolve()), fed.fingerprint(), cache_dir or "")
    if key in _CACHE:
        return _CACHE[key]
    base, data = load_model_and_data(Path(data_dir), fed, cache_dir=cache_dir)
    peft_model, _ = make_lora_model(base.model, fed)
    _CACHE.clear()  # one data set per process: never hold two base models
    _CACHE[key] = GroupWork(peft_model, data.train, data.heldout, fed, key)
    return _CACHE[key]


def get_b(peft_model: Any) -> dict[str, np.ndarray]:
    """B of every LoRA module, float32, by peft's saved tensor name (sorted)."""
    layers = lora_layers(peft_model, ADAPTER)
    return {
        lora_b_name(name): layers[name].lora_B[ADAPTER].weight.detach().cpu().numpy().copy()
        for name in sorted(layers)
    }


def set_b(peft_model: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Load a global B (exactly the tensors of get_b: same names and shapes)."""
    import torch

    layers = lora_layers(peft_model, ADAPTER)
    expected = {lora_b_name(name): name for name in layers}
    if set(arrays) != set(expected):
        extra, missing = sorted(set(arrays) - set(expected)), sorted(set(expected) - set(arrays))
        raise ShapeError(f"global B names differ: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for tensor_name, module in expected.items():
            weight = layers[module].lora_B[ADAPTER].weight
            value = np.asarray(arrays[tensor_name])
            if value.shape != tuple(weight.shape) or not np.isfinite(value).all():
                raise ShapeError(
                    f"global {tensor_name} has shape {value.shape} (or non-finite values); "
                    f"expected {tuple(weight.shape)}"
                )
            weight.copy_(torch.from_numpy(value.astype(np.float32)))


def train_round(work: GroupWork, server_round: int, local_steps: int) -> list[float]:
    """``local_steps`` AdamW steps on B from the B already set; returns the losses."""
    import torch

    fed, model = work.fed, work.peft_model
    params = trainable_b(model)  # refuses anything but lora_B (FFA-LoRA invariant)
    optimizer = torch.optim.AdamW(list(params.values()), lr=fed.train_lr, weight_decay=0.0)
    model.train()
    losses = []
    first = (server_round - 1) * local_steps
    for step in range(first, first + local_steps):
        losses.append(train_step(model, work.train, step, fed, list(params.values()), optimizer))
    model.eval()
    return losses


def statistics(work: GroupWork) -> tuple[CalibrationResult, float]:
    """Partial norm statistics of the adapter now set, and its loss on held-out chunks."""
    result = calibrate(work.peft_model, work.train, work.fed, progress=False)
    loss = heldout_loss(work.peft_model, work.heldout[:32], work.fed.train_batch_size)
    return result, loss
