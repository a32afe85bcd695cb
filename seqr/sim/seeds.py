"""`seqr simulate --seeds N`: the whole simulation for seeds 0..N-1, then mean and spread.

Each seed is a complete run into ``--out/seed-K`` (its own registry and report) with the
federation's ``a-seed`` (the shared frozen A) and ``data-seed`` (which chunks are held out,
and the order of training batches) set to K; seed 0 is the default single run. The summary
(report.json / report.md / report.html in --out) gives, per method, the mean, sample std,
min and max over seeds of test accuracy (overall and per domain) and of held-out loss relative
to the oracle, and each seed's McNemar tests, so a difference between methods can be weighed
against seed-to-seed variation as well as against the test set's size. A seed whose server
refused a client routes fewer domains; the summary names it and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from seqr.core.atomic_write import write_atomic
from seqr.sim import report_plots as plots
from seqr.sim.claims import claim_sentence, pooled_split
from seqr.sim.report import ACCURACY_ORDER, METHOD_NOTES, Block, finite_json, markdown
from seqr.sim.significance import mean_and_spread


def seed_folder(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def run_seeds(cfg: Any, seeds: int, run_one: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Run (or, with cfg.evaluate_only, re-evaluate) every seed; write the summary."""
    reports = []
    for seed in range(seeds):
        print(f"[seqr] seed {seed + 1} of {seeds}: {seed_folder(cfg.out, seed)}", flush=True)
        reports.append(run_one(replace(cfg, seed=seed, out=seed_folder(cfg.out, seed))))
    summary = summarise(reports)
    write_summary(summary, cfg.out)
    return summary


def summarise(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of what each seed's report measured; McNemar counts and
    p-values stay per seed (None where a seed did not make that comparison)."""
    evals = [r["evaluation"] for r in reports]
    methods = [m for m in ACCURACY_ORDER if all(m in e["methods"] for e in evals)]
    accuracy = {
        m: mean_and_spread([e["methods"][m]["routing_accuracy"] for e in evals]) for m in methods
    }
    loss_vs_oracle = {}
    for m in methods:
        rel = [
            (e["methods"][m]["heldout_loss"] - e["methods"]["oracle"]["heldout_loss"])
            / e["methods"]["oracle"]["heldout_loss"]
            for e in evals
            if "heldout_loss" in e["methods"].get(m, {}) and "oracle" in e["methods"]
        ]
        if len(rel) == len(evals):
            loss_vs_oracle[m] = mean_and_spread(rel)
    defaults = list(dict.fromkeys(e["seqr_default"] for e in evals))
    per_domain = {}
    for name in evals[0]["adapters"]:
        per_domain[name] = {
            m: mean_and_spread([e["methods"][m]["per_domain"][name]["accuracy"] for e in evals])
            for m in (*defaults, "arrow")
            if all(name in e["methods"].get(m, {}).get("per_domain", {}) for e in evals)
        }
    mcnemar: dict[str, list[dict[str, Any] | None]] = {}
    for i, e in enumerate(evals):
        for t in e.get("significance", []):
            row = mcnemar.setdefault(f"{t['first']} vs {t['second']}", [None] * len(evals))
            row[i] = {k: t[k] for k in ("first_only", "second_only", "p_value")}
    splits = [e.get("default_by_claim") for e in evals]
    return {
        "seeds": len(reports),
        "not_admitted_per_seed": [_not_admitted(r) for r in reports],
        "default_per_seed": [e["seqr_default"] for e in evals],
        "test_sequences_per_seed": [e["test_sequences"] for e in evals],
        "accuracy": accuracy,
        "accuracy_per_domain": per_domain,
        "heldout_loss_vs_oracle": loss_vs_oracle,
        "agreement_default_brute_force": mean_and_spread(
            [e["agreement_default_brute_force"] for e in evals]
        ),
        "mcnemar": mcnemar,
        # Seeds evaluated before the split existed have none: then no pooled split either.
        "default_by_claim": pooled_split(splits) if all(splits) else None,
        "wall_seconds": mean_and_spread(
            [r.get("run", {}).get("wall_seconds", 0.0) for r in reports]
        ),
    }


def _not_admitted(report: dict[str, Any]) -> dict[str, str]:
    """Client -> why it is missing from that seed's routing (its verdict and reason)."""
    clients = {c["client"]: c for c in report.get("clients", [])}
    missing = {}
    for name in report.get("not_admitted", []):
        client = clients.get(name, {})
        why = [client.get("verdict"), client.get("reason")]
        missing[name] = ": ".join(w for w in why if w) or "not admitted"
    return missing


def _spread(s: dict[str, float], spec: str = ".3f") -> list[str]:
    return [format(s["mean"], spec), format(s["std"], spec),
            f"{format(s['min'], spec)}–{format(s['max'], spec)}"]  # fmt: skip


def _method(m: str) -> str:
    return f"{m} ({METHOD_NOTES[m]})" if m in METHOD_NOTES else m


def _mcnemar_cell(t: dict[str, Any] | None) -> str:
    return "—" if t is None else f"{t['first_only']} vs {t['second_only']}, p = {t['p_value']:.2g}"


def summary_blocks(summary: dict[str, Any]) -> list[Block]:
    n = summary["seeds"]
    defaults = list(dict.fromkeys(summary["default_per_seed"]))
    blocks = [
        Block("h1", f"seqr simulation over {n} seeds"),
        Block("p", f"The whole simulation ran {n} times (seeds 0..{n - 1} of the shared A and "
                   "of the data split and order); each seed's own report is in seed-K/. "
                   f"Default SEQR calibration: {', '.join(defaults)}; test sequences per seed: "
                   + ", ".join(map(str, summary["test_sequences_per_seed"])) + "."),
    ]  # fmt: skip
    missing = [(i, names) for i, names in enumerate(summary["not_admitted_per_seed"]) if names]
    if missing:
        blocks.append(Block("p", "Not every seed routed every domain, so those seeds' "
                                 "accuracies are over fewer adapters: " + "; ".join(
            f"seed {i}: {name} ({why})" for i, names in missing for name, why in names.items())
            + "."))  # fmt: skip
    blocks += [
        Block("h2", "Routing accuracy over seeds (test split)"),
        Block("p", "Mean, sample standard deviation and range over seeds: a difference between "
                   "two methods smaller than their spread depends on the seed."),
        Block("table", header=["method", "mean", "std", "min–max"],
              rows=[[_method(m), *_spread(s)] for m, s in summary["accuracy"].items()]),
        Block("plot", "mean routing accuracy over seeds, +- one standard deviation",
              plot="accuracy_over_seeds.png"),
    ]  # fmt: skip
    per_domain = summary["accuracy_per_domain"]
    cols = list(dict.fromkeys(m for d in per_domain.values() for m in d))
    if cols:
        blocks += [
            Block("h3", "Per domain"),
            Block("p", "Mean accuracy on each domain's test sequences over seeds (range)."),
            Block("table", header=["domain", *cols],
                  rows=[[name, *(f"{d[m]['mean']:.3f} ({d[m]['min']:.2f}–{d[m]['max']:.2f})"
                                 if m in d else "—" for m in cols)]
                        for name, d in per_domain.items()]),
        ]  # fmt: skip
    if summary["heldout_loss_vs_oracle"]:
        blocks += [
            Block("h2", "Held-out loss relative to the oracle"),
            Block("p", "How much worse than the true domain's adapter each choice is, in "
                       "percent of the oracle's loss (0 is perfect)."),
            Block("table", header=["method", "mean", "std", "min–max"],
                  rows=[[_method(m), *_spread({k: 100 * v if k != "n" else v
                                               for k, v in s.items()}, ".2f")]
                        for m, s in summary["heldout_loss_vs_oracle"].items()]),
        ]  # fmt: skip
    if summary["mcnemar"]:
        blocks += [
            Block("h2", "Paired tests (McNemar) per seed"),
            Block("p", "In each seed, on the same test sequences: how often only the first "
                       "method was right vs only the second, and the exact two-sided p-value; "
                       "p < 0.05 in every seed: the difference holds beyond test-set chance "
                       "and beyond the seed. — : that seed did not make the comparison (the "
                       "best alternative calibration is chosen per seed on validation)."),
            Block("table", header=["comparison", *(f"seed {i}" for i in range(n))],
                  rows=[[k, *map(_mcnemar_cell, v)] for k, v in summary["mcnemar"].items()]),
        ]  # fmt: skip
    claims = claim_sentence(summary.get("default_by_claim"), ", ".join(defaults))
    if claims:
        blocks += [Block("h3", "When no adapter claims a sequence (all seeds' test sequences)"),
                   Block("p", claims)]  # fmt: skip
    agree = summary["agreement_default_brute_force"]
    blocks.append(Block("p", "SEQR chose what brute force chose under the same statistics on "
                             f"{agree['min']:.1%} of test sequences in the seed where they "
                             "agreed least."))  # fmt: skip
    return blocks


def write_summary(summary: dict[str, Any], out: Path) -> None:
    from seqr.sim.report_html import render_html

    out.mkdir(parents=True, exist_ok=True)
    blocks = summary_blocks(summary)
    spread = {m: (s["mean"], s["mean"] - s["std"], s["mean"] + s["std"])
              for m, s in summary["accuracy"].items()}  # fmt: skip
    images = {"accuracy_over_seeds.png": plots.accuracy_png(
        spread, f"Routing accuracy over {summary['seeds']} seeds (test split)",
        "routing accuracy (mean +- std)")}  # fmt: skip
    for name, png in images.items():
        write_atomic(out / name, png)
    write_atomic(out / "report.json", json.dumps(finite_json(summary), indent=2).encode())
    write_atomic(out / "report.md", markdown(blocks).encode())
    write_atomic(out / "report.html", render_html(blocks, images).encode())
