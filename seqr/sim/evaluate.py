"""Evaluation of a routed adapter library on held-out text of every domain.

Per-sequence routing accuracy (with Wilson 95% intervals, per domain, and confusion
matrices) for SEQR under four calibrations and with raw norms, SpectR, brute force, our
ARROW and peft's own ``create_arrow_model`` as an outside anchor, and random choice; paired
McNemar tests of the default SEQR against ARROW and against the best other calibration;
held-out loss with the routed adapter against the oracle (the true domain's adapter), the
base model and the exact uniform merge, overall and per domain; per-token routing. Each
domain's held-out chunks are split into a validation half and a test half on which everything
is reported (never tune on the test split). The routing settings are not chosen per
run: every method aggregates every layer's scores and the default SEQR z-scores with query
statistics and aggregates tokens by soft votes (DEFAULT_METHOD, DEFAULT_LAYERS: chosen once on
the project's ten domains, docs/RESULTS.md); the other calibrations are reported beside it,
and each layer subset's validation accuracy is kept as information, never used to choose.

All scores come from one shared pass (seqr/sim/eval_scores.py); losses only for the
(sequence, adapter) pairs the report shows (seqr/sim/eval_losses.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seqr.core.errors import ConfigError, DataError
from seqr.core.model_routing.loss_check import LOSS_CHECK_MARGIN
from seqr.core.model_routing.soft_votes import SOFT_VOTE_TEMPERATURE, vote_statistics
from seqr.sim.claims import claim_split
from seqr.sim.eval_loss_check import loss_checked
from seqr.sim.eval_losses import heldout_losses
from seqr.sim.eval_scores import TEST_ONLY, ExtraScorers, HeldOutScores, score_heldout
from seqr.sim.eval_soft_votes import pool_votes
from seqr.sim.library import AdapterLibrary
from seqr.sim.peft_arrow import peft_arrow_model, peft_arrow_scorers
from seqr.sim.significance import mcnemar_exact, wilson_interval

SOFT_VOTES = "seqr_soft_votes"  # soft token votes under the query statistics
LOSS_CHECKED = "seqr_loss_checked"  # soft votes; close pairs decided by the prompt's loss
# SEQR under each calibration: own statistics, router-measured reference ones, both averaged,
# and query statistics (sequence-level, over unlabeled validation inputs; each adapter's
# decision score standardised too, or per module only); and soft token votes under query
# statistics (seqr.core.model_routing.soft_votes), alone and with the loss check
# (seqr.core.model_routing.loss_check).
SEQR_VARIANTS = (
    "seqr", "seqr_public", "seqr_blend", "seqr_queries", "seqr_queries_per_module", SOFT_VOTES,
    LOSS_CHECKED,
)  # fmt: skip
# Decoder layers whose scores count; the alternatives are reported on validation only.
LAYER_SUBSETS = {"all layers": 0.0, "upper half": 0.5, "upper third": 2 / 3}
# The default routing settings, fixed once (issue 19: re-choosing them per run on a small
# validation split picks noise). Query statistics are what `seqr serve` uses and the one
# calibration no adapter author can steer (docs/RESULTS.md, bench hijack); soft token votes
# under them were ahead of the mean of token z-scores in five of six runs and level in the
# sixth (docs/RESULTS.md, "Soft token votes"); the loss check on their close pairs was ahead
# of soft votes alone in every run measured (docs/RESULTS.md, "The loss check"); subsets of
# layers were not better than all layers on the ten domains.
DEFAULT_CALIBRATION = "seqr_queries"
# Query statistics (DEFAULT_CALIBRATION), soft token votes, close pairs checked by loss.
DEFAULT_METHOD = LOSS_CHECKED
DEFAULT_LAYERS = "all layers"
Stage = Callable[[str, int], Callable[[int], None]]  # (stage, work units) -> advance(n)


@dataclass(frozen=True)
class EvalConfig:
    # Held-out chunks used per domain (validation + test, alternately): 200 gives 100 test
    # sequences per domain where the text has them (issue 19: enough to tell methods apart).
    max_sequences_per_domain: int = 200
    batch_size: int = 8
    seed: int = 0
    per_token_top_k: int = 1
    peft_arrow: bool = True
    losses: bool = True  # False: routing metrics only (minutes faster on CPU)
    # Held-out loss of per-token routing (SEQR's and peft's ARROW): two more routed passes
    # over the test rows, as costly as all per-sequence losses together; off unless asked.
    per_token_losses: bool = False
    # Held-out loss of the exact uniform merge of all adapters: one more pass over the test
    # rows (~15% of the evaluation), a baseline beside the oracle and the base model.
    merge_baseline: bool = False
    # Where to write the shared pass's per-sequence scores (seqr/sim/score_dump.py), or None.
    scores_path: Path | None = None

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
    chunks: torch.Tensor  # (S,) each row's index among its domain's held-out chunks


def split_heldout(
    heldout: Mapping[str, np.ndarray], adapters: tuple[str, ...], cfg: EvalConfig
) -> HeldOut:
    """Every domain's first max_sequences chunks, alternately validation and test."""
    missing = sorted(set(heldout) - set(adapters))
    if missing:
        raise DataError(f"held-out domains {missing} have no adapter in the library")
    ids, labels, is_test = [], [], []
    positions: list[int] = []
    for domain, chunks in heldout.items():
        chunks = chunks[: cfg.max_sequences_per_domain]
        if len(chunks) < 2:
            raise DataError(f"domain {domain!r} has {len(chunks)} held-out chunks; need >= 2")
        ids.append(torch.as_tensor(chunks, dtype=torch.long))
        labels += [adapters.index(domain)] * len(chunks)
        is_test += [i % 2 == 1 for i in range(len(chunks))]
        positions += range(len(chunks))
    return HeldOut(
        torch.cat(ids), torch.tensor(labels), torch.tensor(is_test), torch.tensor(positions)
    )


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


def accuracy(choice: torch.Tensor, labels: torch.Tensor) -> float:
    return float((choice == labels).double().mean())


def confusion(choice: torch.Tensor, labels: torch.Tensor, n: int) -> list[list[int]]:
    matrix = torch.zeros(n, n, dtype=torch.long)
    matrix.index_put_((labels, choice), torch.ones_like(labels), accumulate=True)
    return matrix.tolist()  # rows: true domain, columns: chosen adapter


def with_interval(choice: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    correct, total = int((choice == labels).sum()), int(len(labels))
    return {"correct": correct, "total": total, "ci95": list(wilson_interval(correct, total))}


def per_domain(choice: torch.Tensor, labels: torch.Tensor, adapters: tuple[str, ...]) -> dict:
    """Accuracy with its Wilson 95% interval for each true domain."""
    out = {}
    for i, name in enumerate(adapters):
        rows = labels == i
        if rows.any():
            stats = with_interval(choice[rows], labels[rows])
            out[name] = {"accuracy": stats["correct"] / stats["total"], **stats}
    return out


def _no_stage(stage: str, total: int) -> Callable[[int], None]:
    return lambda done: None


def evaluate(
    library: AdapterLibrary,
    heldout: Mapping[str, np.ndarray],
    cfg: EvalConfig,
    *,
    make_base: Callable[[], Any] | None = None,
    export_paths: list[str] | None = None,
    reference: np.ndarray | None = None,
    stage: Stage = _no_stage,
) -> dict[str, Any]:
    """Everything the simulation report shows, as plain JSON-ready values.

    ``reference``: chunks of public text outside every client's domain; with it, method
    "seqr_public" z-scores SEQR norms against statistics the router measures on that text
    (seqr.core.model_routing.reference) instead of the adapters' own claims, "seqr_blend"
    averages both z-scores. "seqr_queries" z-scores with query statistics: sequence-level
    moments over the validation inputs, unlabeled, as a router would keep them over the
    traffic it serves; "seqr_soft_votes" aggregates the same z-scores by soft token votes.
    "seqr_default" names the default method (DEFAULT_METHOD).
    ``stage(name, total)`` is told each stage as it starts (progress, status.json).
    """
    model, adapters = library.peft_model, library.adapters
    data = split_heldout(heldout, adapters, cfg)
    n = len(adapters)
    extra: ExtraScorers = {}
    arrow_model = None
    if cfg.peft_arrow and make_base is not None and export_paths is not None:
        stage("peft's ARROW model", 0)
        arrow_model = peft_arrow_model(make_base, export_paths)
        extra = {"peft_arrow": peft_arrow_scorers(arrow_model)}
    val, test = ~data.is_test, data.is_test
    ref = [] if reference is None else list(torch.split(torch.as_tensor(reference), cfg.batch_size))
    rows = sum(len(b) for b in ref) + len(data.ids)
    validation = list(torch.split(data.ids[val], cfg.batch_size))
    with _stage_bar(stage, "route held-out text (one pass, every method)", rows) as step:
        scores = score_heldout(
            model, adapters, library.stats, reference=ref, validation=validation,
            test=list(torch.split(data.ids[test], cfg.batch_size)), extra=extra, progress=step,
            soft_vote_temperature=SOFT_VOTE_TEMPERATURE,
        )  # fmt: skip
    # Rows come back validation first, then test: reorder labels the same way.
    order = torch.cat([torch.nonzero(val).flatten(), torch.nonzero(test).flatten()])
    labels, is_test = data.labels[order], data.is_test[order]
    results, decisions = _all_routing_metrics(scores, labels, is_test, n)
    # Soft votes: the test rows' came from the shared pass, the validation rows' (their
    # pool) need the query statistics first, so one more pass over those rows.
    with _stage_bar(stage, "soft token votes of the validation rows", int(val.sum())) as step:
        pool = pool_votes(
            model, adapters, scores.calibrations[DEFAULT_CALIBRATION],
            library.stats[adapters[0]].score, validation, SOFT_VOTE_TEMPERATURE, step,
        )  # fmt: skip
    votes = torch.cat([pool, scores.test_votes["seqr"]])  # the report's row order
    results[SOFT_VOTES], soft_scores, soft_brute = _soft_vote_metrics(
        votes, scores.test_votes["brute_force"], labels, is_test
    )
    decisions[SOFT_VOTES] = soft_scores.argmax(dim=-1)
    checked = loss_checked(model, adapters, data.ids[order], soft_scores, soft_brute, is_test,
                           cfg.batch_size, stage)  # fmt: skip
    decisions[LOSS_CHECKED] = checked.choice
    results[LOSS_CHECKED] = {
        "validation_accuracy": {
            DEFAULT_LAYERS: accuracy(checked.choice[~is_test], labels[~is_test])
        },
        "aggregation": f"soft token votes; where the first two are within {LOSS_CHECK_MARGIN:g} "
        "of each other, the one with the lower loss on the sequence itself",
        "layers": DEFAULT_LAYERS,
        "loss_checked_share": float(checked.close[is_test].double().mean()),
    }
    brute_of_default = {SOFT_VOTES: soft_brute.argmax(-1), LOSS_CHECKED: checked.brute_choice}
    if cfg.scores_path is not None:
        from seqr.sim.score_dump import save_scores

        save_scores(cfg.scores_path, scores, adapters, labels, is_test, data.chunks[order], votes,
                    checked.pair_loss)  # fmt: skip
    test_labels = labels[is_test]
    generator = torch.Generator().manual_seed(cfg.seed)  # drawn in the held-out rows' order
    random_choice = torch.randint(0, n, (len(data.ids),), generator=generator)
    decisions["random"] = random_choice[order]
    for method, choice in decisions.items():
        entry = results.setdefault(method, {})
        entry.setdefault("routing_accuracy", accuracy(choice[is_test], test_labels))
        entry.setdefault("confusion", confusion(choice[is_test], test_labels, n))
        entry.update(with_interval(choice[is_test], test_labels))
        entry["per_domain"] = per_domain(choice[is_test], test_labels, adapters)
    default = DEFAULT_METHOD
    alternatives = [m for m in SEQR_VARIANTS if m in results and m != default]
    # The alternative McNemar compares against: the best on validation, never on test; and
    # what the default replaced: soft votes alone, and the mean of the same z-scores.
    best_other = max(alternatives, key=lambda m: results[m]["validation_accuracy"][DEFAULT_LAYERS])
    right = {m: (c[is_test] == test_labels).tolist() for m, c in decisions.items()}
    others = dict.fromkeys((best_other, SOFT_VOTES, DEFAULT_CALIBRATION, "arrow", "peft_arrow"))
    significance = [
        {"first": default, "second": other, **vars(mcnemar_exact(right[default], right[other]))}
        for other in others
        if other in right
    ]
    agreement = _agreements(scores, decisions, is_test)
    same = decisions[default][is_test] == brute_of_default[default]
    agreement["agreement_default_brute_force"] = float(same.double().mean())
    losses: dict[str, Any] = {}
    if cfg.losses:
        plans = {m: decisions[m][is_test] for m in (*SEQR_VARIANTS, "arrow") if m in decisions}
        # the check's losses of test rows (validation rows first in its order) are reused
        n_val = int(val.sum())
        known = {(row - n_val, name): v for (row, name), v in checked.losses.items()
                 if row >= n_val}  # fmt: skip
        losses = heldout_losses(library, data.ids[test], test_labels, plans, cfg, arrow_model,
                                base_loss=scores.base_loss, stage=stage, known=known)  # fmt: skip
    for method, loss in losses.get("mean", {}).items():
        results.setdefault(method, {})["heldout_loss"] = loss
        results[method]["perplexity"] = float(np.exp(loss))
        results[method]["heldout_loss_per_domain"] = losses["per_domain"][method]
    for method, mistakes in losses.get("mistakes", {}).items():
        results[method]["mistake_losses"] = mistakes
    test_per_domain = {a: int((test_labels == i).sum()) for i, a in enumerate(adapters)}
    choice_default = decisions[default][is_test]
    return {
        "adapters": list(adapters),
        "test_sequences": int(is_test.sum()),
        "validation_sequences": int((~is_test).sum()),
        "test_sequences_per_domain": test_per_domain,
        "sequence_tokens": int(data.ids.shape[1]),
        "methods": results,
        "seqr_default": default,
        "seqr_best_alternative": best_other,
        "significance": significance,
        "misrouted": misrouted(choice_default, test_labels, data.chunks[test], adapters),
        "default_by_claim": claim_split(soft_scores[is_test], choice_default, test_labels),
        **agreement,
    }


def misrouted(
    choice: torch.Tensor, labels: torch.Tensor, chunks: torch.Tensor, adapters: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Each wrongly routed sequence: its domain, the adapter chosen instead, and which of the
    domain's held-out chunks it is (registry_eval adds the text, so a reader can see why)."""
    wrong = torch.nonzero(choice != labels).flatten().tolist()
    return [
        {"domain": adapters[labels[i]], "chosen": adapters[choice[i]], "chunk": int(chunks[i])}
        for i in wrong
    ]


def _all_routing_metrics(
    scores: HeldOutScores, labels: torch.Tensor, is_test: torch.Tensor, n: int
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Each method's per-sequence scores -> its metrics and decisions (every row)."""
    raw = scores.module_means
    own = scores.calibrations["seqr"]
    per_sequence: dict[str, torch.Tensor] = {
        **{label: cal.z(raw["seqr"]) for label, cal in scores.calibrations.items()},
        **{m: v for m, v in raw.items() if m not in ("seqr", "brute_force")},
        "spectr": raw["seqr_raw"],  # SpectR's score is the raw norm: computed once for both
    }
    token = {m: v for m, v in scores.token_means.items() if m != "brute_force_z"}
    token["spectr"] = token["seqr_raw"]
    rows = {m: (scores.rows if m not in TEST_ONLY else int(is_test.sum())) for m in raw}
    results, decisions = {}, {}
    for method, module_means in per_sequence.items():
        results[method], decisions[method] = _routing_metrics(
            module_means, token.get(method), scores.module_layers, labels, is_test, n
        )
        if method != "spectr":  # its speed: the routing-time benchmark
            seconds = scores.seconds.get(method, scores.seconds["seqr"])
            results[method]["routing_seconds_per_sequence"] = seconds / max(scores.rows, 1)
    # Brute force, test rows only, z-scored with the adapters' own statistics and aggregated
    # over the layers SEQR chose: the same scores as "seqr", computed directly (exactness).
    layers = results["seqr"]["layers"]
    brute = decide(own.z(raw["brute_force"]), masks_for(scores.module_layers)[layers])
    decisions["brute_force"] = torch.full_like(labels, -1).masked_scatter(is_test, brute)
    token_brute = scores.token_means["brute_force_z"].argmax(dim=-1)
    results["brute_force"] = {
        "routing_accuracy": accuracy(brute, labels[is_test]),
        "aggregation": f"mean of token scores over {layers} (SEQR's choice)",
        "layers": layers,
        "confusion": confusion(brute, labels[is_test], n),
        "per_token_routing_accuracy": float((token_brute == labels[is_test, None]).double().mean()),
        "routing_seconds_per_sequence": scores.seconds["brute_force"] / max(rows["brute_force"], 1),
    }
    return results, decisions


@contextmanager
def _stage_bar(stage: Stage, name: str, total: int) -> Iterator[Callable[[int], None]]:
    """A stage (status.json) with a progress bar; yields ``advance(rows just done)``."""
    advance = stage(name, total)
    with tqdm(total=total, desc=name.split(" (")[0], unit="seq") as bar:

        def step(k: int) -> None:
            bar.update(k)
            advance(bar.n)

        yield step


def _soft_vote_metrics(
    votes: torch.Tensor, brute_votes: torch.Tensor, labels: torch.Tensor, is_test: torch.Tensor
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Soft votes (every row, validation first) standardised over the validation rows' (the
    query statistics' pool, labels unused): the entry, the standardised shares (the decision
    scores) and brute force's (test rows, ``brute_votes``) under the same statistics."""
    val = ~is_test
    mean, std = vote_statistics(votes[val])
    standardised = (votes - mean) / std
    choice = standardised.argmax(-1)
    entry = {
        "validation_accuracy": {DEFAULT_LAYERS: accuracy(choice[val], labels[val])},
        "aggregation": f"soft token votes (temperature {SOFT_VOTE_TEMPERATURE:g}) over "
        f"{DEFAULT_LAYERS}, vote shares standardised over the validation inputs",
        "layers": DEFAULT_LAYERS,
    }
    return entry, standardised, (brute_votes - mean) / std


def _routing_metrics(
    module_means: torch.Tensor,
    token_means: torch.Tensor | None,
    layers: list[int | None],
    labels: torch.Tensor,
    is_test: torch.Tensor,
    n: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    masks = masks_for(layers)
    val = ~is_test
    val_acc = {
        label: accuracy(decide(module_means[val], m), labels[val]) for label, m in masks.items()
    }
    chosen = DEFAULT_LAYERS
    choice = decide(module_means, masks[chosen])
    out: dict[str, Any] = {
        "routing_accuracy": accuracy(choice[is_test], labels[is_test]),
        "validation_accuracy": val_acc,
        "aggregation": f"mean of token scores over {chosen}",
        "layers": chosen,
        "confusion": confusion(choice[is_test], labels[is_test], n),
    }
    if token_means is not None:  # test rows only, (S_test, T, N)
        token_choice = token_means.argmax(dim=-1)
        token_acc = (token_choice == labels[is_test, None]).double().mean()
        out["per_token_routing_accuracy"] = float(token_acc)
    return out, choice


def _agreements(
    scores: HeldOutScores, decisions: Mapping[str, torch.Tensor], is_test: torch.Tensor
) -> dict[str, float]:
    """SEQR's choices against brute force's under the adapters' own statistics, per sequence
    and per token (the default's agreement, under its statistics, is added by evaluate)."""
    test = is_test
    agreement = float((decisions["seqr"][test] == decisions["brute_force"][test]).double().mean())
    tokens = scores.token_means
    token_agreement = float(
        (tokens["seqr"].argmax(-1) == tokens["brute_force_z"].argmax(-1)).double().mean()
    )
    return {
        "agreement_seqr_brute_force": agreement,
        "agreement_seqr_brute_force_per_token": token_agreement,
    }
