"""Held-out loss of each adapter choice, overall and per domain, each pair computed once.

A plan names one adapter per test sequence (the oracle: the true domain's; a router: its
choice). Plans agree on most sequences (a good router picks the oracle's adapter), so the
loss of every distinct (sequence, adapter) pair is computed once and shared by every plan
that needs it: about one pass over the test rows per baseline (oracle, base model, uniform
merge) plus one sequence per routing mistake. Each adapter's rows run as single-adapter
batches, peft's cheapest mixed-batch case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seqr.core.model_routing import ModelRoutingConfig, RoutedModel
from seqr.sim.eval_scores import next_token_losses
from seqr.sim.library import AdapterLibrary, add_uniform_merge

BASE = "__base__"  # peft's mixed-batch name for "no adapter"


@torch.no_grad()
def sequence_losses(
    forward: Callable[[torch.Tensor, list[str] | None], Any],
    ids: torch.Tensor,
    names: list[str] | None,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(S,) mean next-token cross-entropy per sequence; names: adapter per row (or None)."""
    out = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        rows = None if names is None else names[start : start + batch_size]
        out.append(next_token_losses(forward(batch, rows).logits, batch))
        if progress is not None:
            progress(len(batch))
    return torch.cat(out)


def pair_losses(
    model: Any,
    ids: torch.Tensor,
    plans: Iterable[list[str]],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> dict[tuple[int, str], float]:
    """Loss of every (sequence, adapter) pair some plan needs, each computed once."""
    rows_by_adapter: dict[str, set[int]] = {}
    for names in plans:
        for row, name in enumerate(names):
            rows_by_adapter.setdefault(name, set()).add(row)

    def forward(batch: torch.Tensor, names: list[str] | None) -> Any:
        return model(input_ids=batch)

    out: dict[tuple[int, str], float] = {}
    total = sum(len(rows) for rows in rows_by_adapter.values())
    with tqdm(total=total, desc="held-out loss", unit="seq") as bar:

        def step(k: int) -> None:
            bar.update(k)
            if progress is not None:
                progress(k)

        for name, row_set in rows_by_adapter.items():
            rows = sorted(row_set)
            with only_adapter(model, name):
                losses = sequence_losses(forward, ids[rows], None, batch_size, step)
            for row, loss in zip(rows, losses.tolist(), strict=True):
                out[row, name] = float(loss)
    return out


@contextlib.contextmanager
def only_adapter(model: Any, name: str) -> Iterator[None]:
    """Run ``model`` with one adapter active (BASE: none), then restore the active one.

    Each (sequence, adapter) group is one adapter, so peft's plain path serves it: the mixed-
    batch path (adapter_names) copies each module's input and output once more (~7% slower
    measured on SmolLM2-135M), for the same numbers.
    """
    if name == BASE:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def _by_domain(values: list[float], labels: list[int], adapters: tuple[str, ...]) -> dict:
    out = {}
    for i, name in enumerate(adapters):
        mine = [v for v, label in zip(values, labels, strict=True) if label == i]
        if mine:
            out[name] = float(np.mean(mine))
    return out


def heldout_losses(
    library: AdapterLibrary,
    ids: torch.Tensor,
    labels: torch.Tensor,
    routed: Mapping[str, torch.Tensor],
    cfg: Any,
    arrow_model: Any = None,
    *,
    base_loss: torch.Tensor | None = None,
    stage: Callable[[str, int], Callable[[int], None]] | None = None,
) -> dict[str, dict[str, Any]]:
    """{"mean": {plan: loss}, "per_domain": {plan: {domain: loss}}} on the test rows ``ids``.

    ``routed``: method -> (S,) chosen adapter index per row. Plans besides them: the oracle,
    the base model (``base_loss`` when the scoring pass measured it already) and the exact
    uniform merge; with ``cfg.per_token_losses`` also per-token SEQR routing (own statistics)
    and peft's per-token ARROW, each one more pass.
    """
    model, adapters = library.peft_model, library.adapters
    merged = add_uniform_merge(library)
    rows, label_list = int(len(ids)), labels.tolist()
    plans: dict[str, list[str]] = {
        "oracle": [adapters[i] for i in label_list],
        **({"base": [BASE] * rows} if base_loss is None else {}),
        "uniform_merge": [merged] * rows,
        **{m: [adapters[i] for i in choice.tolist()] for m, choice in routed.items()},
    }
    pairs = len({(r, n) for names in plans.values() for r, n in enumerate(names)})
    advance = stage("held-out loss of each adapter choice", pairs) if stage else None
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if advance is not None:
            advance(done)

    pair_loss = pair_losses(model, ids, plans.values(), cfg.batch_size, step)
    per_row = {
        label: [pair_loss[row, name] for row, name in enumerate(names)]
        for label, names in plans.items()
    }
    if base_loss is not None:
        per_row["base"] = base_loss.tolist()
    if cfg.per_token_losses:
        advance = stage("held-out loss of per-token routing", 2 * rows) if stage else None
        done = 0
        routed_model = RoutedModel(
            model,
            ModelRoutingConfig(mode="per_token", top_k=cfg.per_token_top_k),
            adapters=adapters,
            stats=library.stats,
        )
        per_row["seqr_per_token"] = sequence_losses(
            lambda b, _: routed_model(b), ids, None, cfg.batch_size, step
        ).tolist()
        if arrow_model is not None:
            per_row["peft_arrow_per_token"] = sequence_losses(
                lambda b, _: arrow_model(input_ids=b), ids, None, cfg.batch_size, step
            ).tolist()
    return {
        "mean": {label: float(np.mean(v)) for label, v in per_row.items()},
        "per_domain": {label: _by_domain(v, label_list, adapters) for label, v in per_row.items()},
    }
