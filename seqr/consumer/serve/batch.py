"""The sequences of one registry version that decode together, and their merged KV cache.

Continuous batching (Orca, Yu et al. OSDI 2022) on a transformers DynamicCache: every row is
left-padded to the batch's length T, so each decoding step appends one column for all rows.
New sequences are prefilled in their own forward pass and then merged: the shorter of the two
caches is padded on the left (zeros, masked out) and both are concatenated along the batch.
Nothing a row computes depends on another row: its positions come from its own mask (RoPE
positions count its real tokens only), padded keys get attention weight exactly 0, and each
row's LoRA is its own (peft ``adapter_names``). Finished rows are dropped and the columns that
are padding for every remaining row are cut.

Full-attention decoder layers only (Llama/SmolLM2): a plain DynamicCache of DynamicLayers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seqr.core.errors import ModelError


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return x
    shape = list(x.shape)
    shape[dim] = width
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _layers(cache: Any) -> list[Any]:
    from transformers.cache_utils import DynamicLayer

    layers = list(cache.layers)
    if not all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers):
        raise ModelError("the serving engine supports full-attention decoder models only")
    return layers


def merge(a: Any, mask_a: torch.Tensor, b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Rows of ``a`` then rows of ``b`` in one left-padded cache; mask (B, T) too."""
    from transformers import DynamicCache

    width = max(mask_a.shape[1], mask_b.shape[1])
    pad_a, pad_b = width - mask_a.shape[1], width - mask_b.shape[1]
    merged = []
    for la, lb in zip(_layers(a), _layers(b), strict=True):  # keys/values (B, H, T, D)
        keys = torch.cat([_pad_left(la.keys, pad_a, 2), _pad_left(lb.keys, pad_b, 2)])
        values = torch.cat([_pad_left(la.values, pad_a, 2), _pad_left(lb.values, pad_b, 2)])
        merged.append((keys, values))
    mask = torch.cat([_pad_left(mask_a, pad_a, 1), _pad_left(mask_b, pad_b, 1)])
    return DynamicCache(merged), mask


def keep_rows(cache: Any, mask: torch.Tensor, rows: list[int]) -> tuple[Any, torch.Tensor]:
    """Only ``rows``, without the leading columns that are padding in all of them."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    used = torch.nonzero(mask.any(dim=0)).flatten()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return cache, mask[:, start:]


@dataclass
class Forward:
    """What one forward pass of a batch returns."""

    logits: torch.Tensor  # (B, V) at each row's last position
    cache: Any
    mask: torch.Tensor  # (B, T)


@torch.no_grad()
def prefill(peft_model: Any, ids: torch.Tensor, mask: torch.Tensor, adapters: list[str]) -> Forward:
    """The prompts (left-padded (B, T)) through the model with each row's adapter."""
    from transformers import DynamicCache

    positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)  # each row counts its own tokens
    out = peft_model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=DynamicCache(),
        use_cache=True,
        adapter_names=adapters,
        logits_to_keep=1,
    )
    return Forward(out.logits[:, -1].float(), out.cache, mask)


@torch.no_grad()
def decode(
    peft_model: Any, last: torch.Tensor, cache: Any, mask: torch.Tensor, adapters: list[str]
) -> Forward:
    """One step: each row's last token (B,) at its own next position."""
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    positions = mask.sum(dim=1, keepdim=True) - 1  # (B, 1)
    out = peft_model(
        input_ids=last.unsqueeze(1),
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        adapter_names=adapters,
    )
    return Forward(out.logits[:, -1].float(), out.cache, mask)
