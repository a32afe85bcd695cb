"""Evaluation of a routed adapter library on held-out text of every domain.

Per-sequence routing accuracy (with confusion matrices) for SEQR with z-scores and with raw
norms, SpectR, brute force, our ARROW and peft's own ``create_arrow_model`` as an outside
anchor, and random choice; held-out loss with the routed adapter against the oracle (the
true domain's adapter), the base model and the exact uniform merge; per-token routing; and
routing time. Each domain's held-out chunks are split into a validation half, on which the
one free setting (which layers' scores to aggregate) is chosen per method, and a test half on
which everything is reported (SEQR.md: never tune on the test split). The calibration SEQR
z-scores with (own, reference or blended statistics) is chosen on validation the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seqr import ArrowRouter, BruteForceRouter, SeqrRouter, SpectrRouter
from seqr.core.errors import ConfigError, DataError
from seqr.core.model_routing import (
    ModelRoutingConfig,
    RoutedModel,
    RoutedModule,
    blend_statistics,
    build_routed_modules,
    reference_statistics,
)
from seqr.sim.eval_scores import ExtraScorers, MethodScores, collect_method_scores
from seqr.sim.library import AdapterLibrary, add_uniform_merge

# method -> (router, z-scored with the adapters' own statistics?)
ROUTED_METHODS: dict[str, tuple[Callable[..., Any], bool]] = {
    "seqr": (SeqrRouter, True),
    "seqr_raw": (SeqrRouter, False),
    "spectr": (SpectrRouter, False),  # the exact raw norm, as in the SpectR paper
    "brute_force": (BruteForceRouter, True),  # same scores as "seqr": checks exactness
    "arrow": (ArrowRouter, False),
}
# SEQR under each calibration: own statistics, router-measured reference ones, both averaged,
# and query statistics (sequence-level, over unlabeled validation inputs).
SEQR_CALIBRATIONS = ("seqr", "seqr_public", "seqr_blend", "seqr_queries")
# Aggregation candidates chosen on validation data: decoder layers whose scores count.
LAYER_SUBSETS = {"all layers": 0.0, "upper half": 0.5, "upper third": 2 / 3}


@dataclass(frozen=True)
class EvalConfig:
    max_sequences_per_domain: int = 32  # held-out chunks used per domain (val + test)
    batch_size: int = 8
    seed: int = 0
    per_token_top_k: int = 1
    peft_arrow: bool = True
    losses: bool = True  # False: routing metrics only (minutes faster on CPU)

    def __post_init__(self) -> None:
        if self.max_sequences_per_domain < 2:
            raise ConfigError("max_sequences_per_domain must be >= 2 (validation + test)")
        if self.batch_size < 1 or self.per_token_top_k < 1:
            raise ConfigError("batch_size and per_token_top_k must be >= 1")


@dataclass
class HeldOut:
    ids: torch.Tensor  # (S, T) token ids, every domain's chunks
    labels: torch.Tensor  # (S,) index of the true domain's adapter
    is_test: torch.Tensor  # (S,) bool; the rest is validation


def split_heldout(
    heldout: Mapping[str, np.ndarray], adapters: tuple[str, ...], cfg: EvalConfig
) -> HeldOut:
    """Every domain's first max_sequences chunks, alternately validation and test."""
    missing = sorted(set(heldout) - set(adapters))
    if missing:
        raise DataError(f"held-out domains {missing} have no adapter in the library")
    ids, labels, is_test = [], [], []
    for domain, chunks in heldout.items():
        chunks = chunks[: cfg.max_sequences_per_domain]
        if len(chunks) < 2:
            raise DataError(f"domain {domain!r} has {len(chunks)} held-out chunks; need >= 2")
        ids.append(torch.as_tensor(chunks, dtype=torch.long))
        labels += [adapters.index(domain)] * len(chunks)
        is_test += [i % 2 == 1 for i in range(len(chunks))]
    return HeldOut(torch.cat(ids), torch.tensor(labels), torch.tensor(is_test))


def layer_mask(module_layers: list[int | None], share_skipped: float) -> torch.Tensor:
    """(M,) bool: modules in the upper (1 - share_skipped) of the decoder layers."""
    known = [i for i in module_layers if i is not None]
    first = min(known) + share_skipped * (max(known) - min(known) + 1)
    return torch.tensor([i is not None and i >= first for i in module_layers])


def masks_for(module_layers: list[int | None]) -> dict[str, torch.Tensor]:
    return {label: layer_mask(module_layers, share) for label, share in LAYER_SUBSETS.items()}


def decide(module_means: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(S,) chosen adapter: argmax of the mean over the masked modules of token-mean scores."""
    return module_means[:, mask].mean(dim=1).argmax(dim=-1)


def recalibrate(
    module_means: torch.Tensor, source: Sequence[RoutedModule], target: Sequence[RoutedModule]
) -> torch.Tensor:
    """(S, M, N) token-mean z-scores under ``source``'s statistics, z-scored with ``target``'s.

    Exact up to rounding: a z-score is affine per module and adapter, so it commutes with the
    token mean. One brute-force pass thus gives brute force under every calibration.
    """

    def moments(modules: Sequence[RoutedModule]) -> tuple[torch.Tensor, torch.Tensor]:
        if any(m.router.mean is None for m in modules):
            raise ConfigError("recalibrate needs routers built with statistics")
        means, stds = ([getattr(m.router, k) for m in modules] for k in ("mean", "std"))
        return torch.stack(means).double(), torch.stack(stds).double()

    (mean_s, std_s), (mean_t, std_t) = moments(source), moments(target)
    return (module_means.double() * std_s + mean_s - mean_t) / std_t


def accuracy(choice: torch.Tensor, labels: torch.Tensor) -> float:
    return float((choice == labels).double().mean())


def confusion(choice: torch.Tensor, labels: torch.Tensor, n: int) -> list[list[int]]:
    matrix = torch.zeros(n, n, dtype=torch.long)
    matrix.index_put_((labels, choice), torch.ones_like(labels), accumulate=True)
    return matrix.tolist()  # rows: true domain, columns: chosen adapter


@torch.no_grad()
def sequence_losses(
    forward: Callable[[torch.Tensor, list[str] | None], Any],
    ids: torch.Tensor,
    names: list[str] | None,
    batch_size: int,
) -> torch.Tensor:
    """(S,) mean next-token cross-entropy per sequence; names: adapter per row (or None)."""
    out = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        rows = None if names is None else names[start : start + batch_size]
        logits = forward(batch, rows).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch[:, 1:], reduction="none"
        )
        out.append(loss.mean(dim=1))
    return torch.cat(out)


def peft_arrow_model(make_base: Callable[[], Any], export_paths: list[str]) -> Any:
    """peft's own ARROW (create_arrow_model) over the same exports: the outside anchor."""
    from peft import ArrowConfig, create_arrow_model

    model = create_arrow_model(make_base(), export_paths, ArrowConfig(rng_seed=0))
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


def evaluate(
    library: AdapterLibrary,
    heldout: Mapping[str, np.ndarray],
    cfg: EvalConfig,
    *,
    make_base: Callable[[], Any] | None = None,
    export_paths: list[str] | None = None,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """Everything the simulation report shows, as plain JSON-ready values.

    ``reference``: chunks of public text outside every client's domain; with it, method
    "seqr_public" z-scores SEQR norms against statistics the router measures on that text
    (seqr.core.model_routing.reference) instead of the adapters' own claims, "seqr_blend"
    averages both z-scores. "seqr_queries" z-scores with query statistics: sequence-level
    moments over the validation inputs, unlabeled, as a router would keep them over the
    traffic it serves. "seqr_selected" names the calibration best on validation.
    """
    model, adapters = library.peft_model, library.adapters
    data = split_heldout(heldout, adapters, cfg)
    n = len(adapters)
    methods = {
        name: build_routed_modules(
            model, adapters, stats=library.stats if z else None, router_factory=factory
        )
        for name, (factory, z) in ROUTED_METHODS.items()
    }
    score = library.stats[adapters[0]].score  # router statistics measure the adapters' kind
    if reference is not None:
        ref_batches = torch.split(torch.as_tensor(reference, dtype=torch.long), cfg.batch_size)
        ref_stats = reference_statistics(model, adapters, ref_batches, score=score)
        methods["seqr_public"] = build_routed_modules(model, adapters, stats=ref_stats)
        blend = blend_statistics(library.stats, ref_stats)
        methods["seqr_blend"] = build_routed_modules(model, adapters, stats=blend)
    val_batches = torch.split(data.ids[~data.is_test], cfg.batch_size)  # inputs, never labels
    queries = reference_statistics(model, adapters, val_batches, score=score, per_sequence=True)
    methods["seqr_queries"] = build_routed_modules(model, adapters, stats=queries)
    extra: ExtraScorers = {}
    arrow_model = None
    if cfg.peft_arrow and make_base is not None and export_paths is not None:
        arrow_model = peft_arrow_model(make_base, export_paths)
        extra = {"peft_arrow": peft_arrow_scorers(arrow_model)}
    batches = list(torch.split(data.ids, cfg.batch_size))
    with tqdm(total=len(data.ids), desc="route held-out", unit="seq") as bar:
        scores = collect_method_scores(model, methods, batches, extra=extra, progress=bar.update)
    layers = [m.layer_index for m in methods["seqr"]]
    val, test = ~data.is_test, data.is_test
    results: dict[str, dict[str, Any]] = {}
    decisions: dict[str, torch.Tensor] = {}
    for method, method_scores in scores.items():
        results[method], decisions[method] = _routing_metrics(
            method_scores, layers, data, n, val, test
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    random_choice = torch.randint(0, n, (len(data.ids),), generator=generator)
    decisions["random"] = random_choice
    results["random"] = {
        "routing_accuracy": accuracy(random_choice[test], data.labels[test]),
        "confusion": confusion(random_choice[test], data.labels[test], n),
    }
    calibrations = [m for m in SEQR_CALIBRATIONS if m in results]
    selected = max(calibrations, key=lambda m: max(results[m]["validation_accuracy"].values()))
    agreement = float((decisions["seqr"][test] == decisions["brute_force"][test]).double().mean())
    brute_force = recalibrate(
        scores["brute_force"].sequence_modules(), methods["brute_force"], methods[selected]
    )
    brute_force_selected = decide(brute_force, masks_for(layers)[results[selected]["layers"]])
    selected_agreement = float((decisions[selected] == brute_force_selected)[test].double().mean())
    token_choices = {
        m: torch.cat(scores[m].token_means).argmax(-1) for m in ("seqr", "brute_force")
    }
    token_agreement = float((token_choices["seqr"] == token_choices["brute_force"]).double().mean())
    losses = _losses(library, data, decisions, cfg, arrow_model) if cfg.losses else {}
    for method, loss in losses.items():
        results.setdefault(method, {})["heldout_loss"] = loss
        results[method]["perplexity"] = float(np.exp(loss))
    return {
        "adapters": list(adapters),
        "test_sequences": int(test.sum()),
        "validation_sequences": int(val.sum()),
        "sequence_tokens": int(data.ids.shape[1]),
        "methods": results,
        "seqr_selected": selected,
        "agreement_seqr_brute_force": agreement,
        "agreement_seqr_brute_force_per_token": token_agreement,
        "agreement_selected_brute_force": selected_agreement,
    }


def _routing_metrics(
    scores: MethodScores,
    layers: list[int | None],
    data: HeldOut,
    n: int,
    val: torch.Tensor,
    test: torch.Tensor,
) -> tuple[dict[str, Any], torch.Tensor]:
    module_means = scores.sequence_modules()
    masks = masks_for(layers)
    val_acc = {
        label: accuracy(decide(module_means[val], m), data.labels[val])
        for label, m in masks.items()
    }
    chosen = max(val_acc, key=lambda label: (val_acc[label], -list(masks).index(label)))
    choice = decide(module_means, masks[chosen])
    token_choice = torch.cat(scores.token_means).argmax(dim=-1)  # (S, T)
    token_acc = (token_choice[test] == data.labels[test, None]).double().mean()
    return {
        "routing_accuracy": accuracy(choice[test], data.labels[test]),
        "validation_accuracy": val_acc,
        "aggregation": f"mean of token scores over {chosen}",
        "layers": chosen,
        "per_token_routing_accuracy": float(token_acc),
        "confusion": confusion(choice[test], data.labels[test], n),
        "routing_seconds_per_sequence": scores.seconds / len(data.ids),
    }, choice


def _losses(
    library: AdapterLibrary,
    data: HeldOut,
    decisions: Mapping[str, torch.Tensor],
    cfg: EvalConfig,
    arrow_model: Any,
) -> dict[str, float]:
    model, adapters = library.peft_model, library.adapters
    ids = data.ids[data.is_test]
    merged = add_uniform_merge(library)
    rows = int(len(ids))
    plans: dict[str, list[str]] = {
        "oracle": [adapters[i] for i in data.labels[data.is_test].tolist()],
        "base": ["__base__"] * rows,
        "uniform_merge": [merged] * rows,
    }
    for method in (*SEQR_CALIBRATIONS, "seqr_raw", "arrow", "random"):
        if method in decisions:
            plans[method] = [adapters[i] for i in decisions[method][data.is_test].tolist()]
    pair_loss = pair_losses(model, ids, plans.values(), cfg.batch_size)
    losses = {
        label: float(np.mean([pair_loss[row, name] for row, name in enumerate(names)]))
        for label, names in plans.items()
    }
    routed = RoutedModel(
        model,
        ModelRoutingConfig(mode="per_token", top_k=cfg.per_token_top_k),
        adapters=adapters,
        stats=library.stats,
    )
    losses["seqr_per_token"] = float(
        sequence_losses(lambda b, _: routed(b), ids, None, cfg.batch_size).mean()
    )
    if arrow_model is not None:
        losses["peft_arrow_per_token"] = float(
            sequence_losses(lambda b, _: arrow_model(input_ids=b), ids, None, cfg.batch_size).mean()
        )
    return losses


def pair_losses(
    model: Any, ids: torch.Tensor, plans: Iterable[list[str]], batch_size: int
) -> dict[tuple[int, str], float]:
    """Loss of every (sequence, adapter) pair some plan needs, each computed once.

    Plans agree on most sequences (a good router picks the oracle's adapter), so this costs
    about one pass per distinct choice instead of one pass per plan; each adapter's rows run
    as single-adapter batches, peft's cheapest mixed-batch case.
    """
    rows_by_adapter: dict[str, set[int]] = {}
    for names in plans:
        for row, name in enumerate(names):
            rows_by_adapter.setdefault(name, set()).add(row)

    def with_adapter(batch: torch.Tensor, names: list[str] | None) -> Any:
        return model(input_ids=batch, adapter_names=names)

    out: dict[tuple[int, str], float] = {}
    total = sum(len(rows) for rows in rows_by_adapter.values())
    with tqdm(total=total, desc="held-out loss", unit="seq") as bar:
        for name, row_set in rows_by_adapter.items():
            rows = sorted(row_set)
            losses = sequence_losses(with_adapter, ids[rows], [name] * len(rows), batch_size)
            for row, loss in zip(rows, losses.tolist(), strict=True):
                out[row, name] = float(loss)
            bar.update(len(rows))
    return out
