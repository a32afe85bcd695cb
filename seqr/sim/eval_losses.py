"""Held-out loss of each adapter choice, overall and per domain, each pair computed once.

A plan names one adapter per test sequence (the oracle: the true domain's; a router: its
choice). Plans agree on most sequences (a good router picks the oracle's adapter), so the
loss of every distinct (sequence, adapter) pair is computed once and shared by every plan
that needs it: about one pass over the test rows per baseline (oracle, base model, uniform
merge) plus one sequence per routing mistake. Each adapter's rows run with that adapter
merged into the base weights (seqr.sim.lm_loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seqr.core.model_routing import ModelRoutingConfig, RoutedModel
from seqr.sim.library import AdapterLibrary, add_uniform_merge
from seqr.sim.lm_loss import BASE, causal_lm_losses, merged_adapter, next_token_losses


@torch.no_grad()
def sequence_losses(
    losses_of: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(S,) mean next-token cross-entropy per sequence; losses_of(batch) -> (B,) losses."""
    out = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        out.append(losses_of(batch))
        if progress is not None:
            progress(len(batch))
    return torch.cat(out)


def pair_losses(
    model: Any,
    ids: torch.Tensor,
    plans: Iterable[list[str]],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    known: Mapping[tuple[int, str], float] | None = None,
) -> dict[tuple[int, str], float]:
    """Loss of every (sequence, adapter) pair some plan needs, each computed once; pairs in
    ``known`` (computed earlier by the same pass) are taken from it."""
    known = known or {}
    rows_by_adapter: dict[str, set[int]] = {}
    out: dict[tuple[int, str], float] = {}
    for names in plans:
        for row, name in enumerate(names):
            if (row, name) in known:
                out[row, name] = known[row, name]
            else:
                rows_by_adapter.setdefault(name, set()).add(row)

    total = sum(len(rows) for rows in rows_by_adapter.values())
    with tqdm(total=total, desc="held-out loss", unit="seq") as bar:

        def step(k: int) -> None:
            bar.update(k)
            if progress is not None:
                progress(k)

        for name, row_set in rows_by_adapter.items():
            rows = sorted(row_set)
            with merged_adapter(model, name):
                losses = sequence_losses(
                    lambda batch: causal_lm_losses(model, batch), ids[rows], batch_size, step
                )
            for row, loss in zip(rows, losses.tolist(), strict=True):
                out[row, name] = float(loss)
    return out


def counting(
    stage: Callable[[str, int], Callable[[int], None]] | None, name: str, total: int
) -> Callable[[int], None]:
    """``step(rows just done)`` that starts stage ``name`` of ``total`` rows and tells it the
    running count (status.json); a no-op without a stage."""
    advance = stage(name, total) if stage else None
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if advance is not None:
            advance(done)

    return step


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
    known: Mapping[tuple[int, str], float] | None = None,
) -> dict[str, dict[str, Any]]:
    """{"mean": {plan: loss}, "per_domain": {plan: {domain: loss}}, "mistakes": {method:
    mistake_losses}} on the test rows ``ids``.

    ``routed``: method -> (S,) chosen adapter index per row; ``known``: (row, adapter) losses
    computed already (the loss check's), not computed again. Plans besides them: the oracle,
    the base model (``base_loss`` when the scoring pass measured it already), with
    ``cfg.merge_baseline`` the exact uniform merge; with ``cfg.per_token_losses`` also
    per-token SEQR routing (own statistics) and peft's per-token ARROW, each one more pass.
    """
    model, adapters = library.peft_model, library.adapters
    rows, label_list = int(len(ids)), labels.tolist()
    plans: dict[str, list[str]] = {
        "oracle": [adapters[i] for i in label_list],
        **({"base": [BASE] * rows} if base_loss is None else {}),
        **({"uniform_merge": [add_uniform_merge(library)] * rows} if cfg.merge_baseline else {}),
        **{m: [adapters[i] for i in choice.tolist()] for m, choice in routed.items()},
    }
    known = known or {}
    pairs = len({(r, n) for names in plans.values() for r, n in enumerate(names)} - set(known))
    step = counting(stage, "held-out loss of each adapter choice", pairs)
    pair_loss = pair_losses(model, ids, plans.values(), cfg.batch_size, step, known)
    per_row = {
        label: [pair_loss[row, name] for row, name in enumerate(names)]
        for label, names in plans.items()
    }
    if base_loss is not None:
        per_row["base"] = base_loss.tolist()
    if cfg.per_token_losses:
        step = counting(stage, "held-out loss of per-token routing", 2 * rows)
        routed_model = RoutedModel(
            model,
            ModelRoutingConfig(mode="per_token", top_k=cfg.per_token_top_k),
            adapters=adapters,
            stats=library.stats,
        )
        per_row["seqr_per_token"] = sequence_losses(
            lambda b: next_token_losses(routed_model(b).logits, b), ids, cfg.batch_size, step
        ).tolist()
        if arrow_model is not None:
            per_row["peft_arrow_per_token"] = sequence_losses(
                lambda b: next_token_losses(arrow_model(input_ids=b).logits, b),
                ids, cfg.batch_size, step,
            ).tolist()  # fmt: skip
    return {
        "mean": {label: float(np.mean(v)) for label, v in per_row.items()},
        "per_domain": {label: _by_domain(v, label_list, adapters) for label, v in per_row.items()},
        "mistakes": {
            m: mistake_losses(plans[m], plans["oracle"], per_row[m], per_row["oracle"])
            for m in routed
        },
    }


def mistake_losses(
    chosen: list[str], labelled: list[str], chosen_loss: list[float], labelled_loss: list[float]
) -> dict[str, Any]:
    """On the rows routed to another domain's adapter: how many, on how many of them that
    adapter's loss is the lower one (a mistake only by the labels), and both mean losses.
    Accuracy counts every such row wrong; this says whether the text agrees."""
    rows = [r for r, (c, o) in enumerate(zip(chosen, labelled, strict=True)) if c != o]
    return {
        "rows": len(rows),
        "chosen_lower": sum(chosen_loss[r] < labelled_loss[r] for r in rows),
        "chosen_loss": float(np.mean([chosen_loss[r] for r in rows])) if rows else None,
        "labelled_loss": float(np.mean([labelled_loss[r] for r in rows])) if rows else None,
    }
