"""The simulation report: report.json, report.md, report.html and PNG plots.

The content is built once as a list of blocks (headings, sentences, tables, plots) and
rendered twice: Markdown here, self-contained HTML in seqr/sim/report_html.py. Every section
says in a sentence what its numbers mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqr.core.atomic_write import write_atomic
from seqr.sim import report_plots as plots
from seqr.sim.claims import claim_sentence

ACCURACY_ORDER = [
    "seqr_loss_checked", "seqr_soft_votes", "seqr_queries", "seqr_queries_per_module",
    "seqr_blend", "seqr_public", "seqr", "seqr_raw", "spectr", "brute_force", "arrow",
    "peft_arrow", "random",
]  # fmt: skip
LOSS_ORDER = [
    "oracle", "seqr_loss_checked", "seqr_soft_votes", "seqr_queries", "seqr_queries_per_module",
    "seqr_blend", "seqr_public", "seqr", "seqr_per_token", "seqr_raw", "arrow",
    "peft_arrow_per_token", "uniform_merge", "random", "base",
]  # fmt: skip
METHOD_NOTES = {
    "seqr": "SEQR, the adapters' own statistics",
    "seqr_public": "SEQR, statistics measured on public reference text",
    "seqr_blend": "SEQR, own and reference z-scores averaged",
    "seqr_queries": "SEQR, statistics of unlabeled validation inputs (decisions standardised)",
    "seqr_queries_per_module": "SEQR, statistics of unlabeled validation inputs, per module only",
    "seqr_soft_votes": "SEQR, query statistics, soft token votes standardised over the same inputs",
    "seqr_loss_checked": "SEQR soft votes; the two best, where close, decided by the text's loss",
    "seqr_raw": "SEQR norms without z-scores",
    "spectr": "SpectR: the same raw norms via the SVD (computed once with seqr_raw)",
    "brute_force": "||B A x|| computed directly (checks SEQR)",
    "arrow": "ARROW, our implementation",
    "peft_arrow": "ARROW, peft's create_arrow_model",
    "random": "a random adapter",
    "oracle": "the true domain's adapter",
    "base": "no adapter",
    "uniform_merge": "the mean of all adapters",
    "seqr_per_token": "SEQR per token (own statistics)",
    "peft_arrow_per_token": "peft's ARROW per token",
}


@dataclass
class Block:
    kind: str  # "h1", "h2", "p", "table", "plot"
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    plot: str = ""  # file name of the PNG


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _ci(entry: dict[str, Any]) -> str:
    low, high = entry.get("ci95", (None, None))
    return "—" if low is None else f"{low:.3f}–{high:.3f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def default_seqr(evaluation: dict[str, Any]) -> str:
    return str(evaluation.get("seqr_default", "seqr"))


def build(report: dict[str, Any]) -> tuple[list[Block], dict[str, Callable[[], bytes]]]:
    """The report's blocks, and the plots they name (file name -> draw to PNG bytes)."""
    ev, run = report["evaluation"], report.get("run", {})
    methods, names = ev["methods"], ev["adapters"]
    sel = default_seqr(ev)
    blocks: list[Block] = [Block("h1", "seqr simulation report")]
    drawn: dict[str, Callable[[], bytes]] = {}
    acc = methods.get(sel, {})
    arrow = methods.get("arrow", {})
    per_domain_tests = ev.get("test_sequences_per_domain", {})
    blocks.append(Block("p", (
        f"{len(names)} clients trained one adapter each on a private text domain "
        f"({', '.join(names)}); the published registry was audited and its adapters routed "
        f"on {ev['test_sequences']} held-out test sequences of {ev['sequence_tokens']} tokens "
        f"({_range(per_domain_tests)} per domain). SEQR ({sel}) chose the right adapter for "
        f"{_fmt(acc.get('routing_accuracy'))} of them (95% interval {_ci(acc)}), ARROW for "
        f"{_fmt(arrow.get('routing_accuracy'))} ({_ci(arrow)})."
    )))  # fmt: skip
    blocks += _run_section(run, per_domain_tests, drawn)
    blocks += _clients_section(report.get("clients", []), drawn)
    blocks += _accuracy_section(ev, drawn)
    from seqr.sim.report_losses import loss_section  # it reads this module's tables

    blocks += loss_section(ev, drawn)
    if report.get("timing_plot"):
        drawn["routing_time.png"] = report["timing_plot"]
        blocks += [Block("h2", "Routing time"), Block("p", (
            "Time to score one token in one LoRA module against N adapters, at the model's "
            "module shape: SEQR grows with N far more slowly than SpectR and brute force."
        )), Block("plot", "routing time per token and module against N",
                  plot="routing_time.png")]  # fmt: skip
    if report.get("notes"):
        blocks += [Block("h2", "Notes")] + [Block("p", str(n)) for n in report["notes"]]
    return blocks, drawn


def _range(counts: dict[str, int]) -> str:
    if not counts:
        return "—"
    low, high = min(counts.values()), max(counts.values())
    return str(low) if low == high else f"{low}–{high}"


def _run_section(run: dict[str, Any], per_domain_tests: dict[str, int], drawn: dict) -> list[Block]:
    if not run:
        return []
    training = run.get("training", {})
    rows = [
        ["clients (one domain each)", str(run.get("clients", "—"))],
        ["base model", str(run.get("base_model", "—"))],
        ["training per client", f"{training.get('steps', '—')} steps of "
         f"{training.get('batch_size', '—')} x {training.get('sequence_tokens', '—')} tokens"],
        ["seed (shared A, data split and order)", str(run.get("seed", 0))],
        ["held-out sequences per domain asked", f"{run.get('held_out_sequences_per_domain')} "
         f"(half validation, half test; test used: {_range(per_domain_tests)})"],
        ["mode", "quick" if run.get("quick") else "full"
         + (", evaluation only (registry of an earlier run)" if run.get("evaluate_only") else "")],
        ["federation wall time", _duration(run.get("federation_seconds"))],
        ["evaluation wall time", _duration(run.get("evaluation_seconds"))],
        ["peak memory: evaluation / one client / whole federation",
         f"{run.get('peak_rss_mib_evaluation', '—')} / {run.get('peak_rss_mib_per_client', '—')}"
         f" / {run.get('peak_rss_mib_federation_total', '—')} MiB"],
        ["machine", str(run.get("machine", "—"))],
    ]  # fmt: skip
    blocks = [Block("h2", "Run"), Block("table", header=["setting", "value"], rows=rows)]
    stages = run.get("stages", [])
    if stages:
        blocks += [
            Block("h3", "Wall time per stage"),
            Block("p", "Where the run's time went. The federation is every client's "
                       "training, calibration and signing, one client per core at a time."),
            Block("table", header=["stage", "wall time"],
                  rows=[[str(s["stage"]), _duration(s["seconds"])] for s in stages]),
            Block("plot", "wall time per stage", plot="stages.png"),
        ]  # fmt: skip
        drawn["stages.png"] = lambda: plots.stages_png(stages)
    return blocks


def _clients_section(clients: list[dict[str, Any]], drawn: dict) -> list[Block]:
    if not clients:
        return []
    rows = []
    for c in clients:
        losses = c.get("losses") or []
        rows.append([
            c["client"], c["verdict"], c.get("reason") or "—",
            _duration(c.get("stage_seconds", {}).get("training")),
            _fmt(losses[0][1] if losses else None), _fmt(losses[-1][1] if losses else None),
        ])  # fmt: skip
    blocks = [
        Block("h2", "Clients and admission"),
        Block("p", "Each client's verdict from the server (the audited registry decides "
                   "'admitted'); a client that failed or was refused is left out of the "
                   "evaluation, which routes over the admitted adapters."),
        Block("table", header=["client", "verdict", "reason", "training time",
                               "first loss", "last loss"], rows=rows),
    ]  # fmt: skip
    curves = {c["client"]: c["losses"] for c in clients if c.get("losses")}
    if curves:
        drawn["training_loss.png"] = lambda: plots.loss_curves_png(curves)
        blocks += [Block("p", "Training loss per step: every curve should fall; one that "
                              "stays flat trained nothing useful."),
                   Block("plot", "training loss per client", plot="training_loss.png")]  # fmt: skip
    return blocks


def _accuracy_section(ev: dict[str, Any], drawn: dict) -> list[Block]:
    methods, names, sel = ev["methods"], ev["adapters"], default_seqr(ev)
    shown = [m for m in ACCURACY_ORDER if "routing_accuracy" in methods.get(m, {})]
    rows = []
    for name in shown:
        m = methods[name]
        ms = m.get("routing_seconds_per_sequence")
        rows.append([
            name + (" (default)" if name == sel else ""), METHOD_NOTES.get(name, ""),
            f"{m['routing_accuracy']:.3f}", _ci(m), _fmt(m.get("per_token_routing_accuracy")),
            m.get("layers", "—"), _fmt(None if ms is None else ms * 1e3, ".2f"),
        ])  # fmt: skip
    drawn["accuracy.png"] = lambda: plots.accuracy_png(
        {n: (methods[n]["routing_accuracy"], *methods[n].get("ci95", (0, 0))) for n in shown},
        "Per-sequence routing accuracy (test split)",
    )
    drawn["confusion_seqr.png"] = lambda: plots.confusion_png(
        methods[sel]["confusion"], names, f"SEQR ({sel}), test split"
    )
    blocks = [
        Block("h2", "Routing accuracy (per sequence, test split)"),
        Block("p", "The share of test sequences routed to their own domain's adapter, with a "
                   "Wilson 95% interval: intervals that overlap much mean the test cannot tell "
                   "those methods apart. Every method aggregates all layers; the default SEQR "
                   "calibration (query statistics) is fixed, not chosen on this run."),
        Block("table", header=["method", "what", "accuracy", "95% interval", "per token",
                               "layers", "ms / sequence"], rows=rows),
        Block("plot", "routing accuracy with 95% intervals", plot="accuracy.png"),
    ]  # fmt: skip
    blocks += _per_domain_blocks(ev, drawn)
    blocks += _misrouted_blocks(ev)
    claims = claim_sentence(ev.get("default_by_claim"), sel)
    blocks += (
        [Block("h3", "When no adapter claims a sequence"), Block("p", claims)] if claims else []
    )
    blocks += _significance_blocks(ev)
    checked = ev["methods"].get("seqr_loss_checked", {}).get("loss_checked_share")
    if checked is not None:
        blocks += [
            Block("h3", "The loss check"),
            Block("p", f"seqr_loss_checked let the sequence's own next-token loss decide "
                       f"between soft votes' two best adapters on {checked:.1%} of test "
                       "sequences (those within the margin; docs/ROUTING.md). Its held-out "
                       "loss below is measured on the text it checked, so it is not an "
                       "independent estimate of its quality; its accuracy is."),
        ]  # fmt: skip
    blocks += [
        Block("h3", "Exactness"),
        Block("p", (
            f"SEQR and brute force chose the same adapter for "
            f"{ev['agreement_seqr_brute_force']:.1%} of test sequences "
            f"({ev['agreement_seqr_brute_force_per_token']:.1%} of tokens) with the adapters' "
            f"own statistics, and {ev['agreement_default_brute_force']:.1%} with {sel}'s"
            ": SEQR computes the same norms as brute force, only faster (100% means exact)."
        )),
        Block("h3", "Confusion matrix"),
        Block("p", "Rows: the true domain; columns: the adapter SEQR chose. Off-diagonal cells "
                   "are the mistakes, and show which domains look alike to the router."),
        Block("plot", f"confusion matrix of SEQR ({sel})", plot="confusion_seqr.png"),
    ]  # fmt: skip
    return blocks


def _per_domain_blocks(ev: dict[str, Any], drawn: dict) -> list[Block]:
    methods, names, sel = ev["methods"], ev["adapters"], default_seqr(ev)
    cols = [m for m in dict.fromkeys([sel, ev.get("seqr_best_alternative"), "arrow"])
            if m and "per_domain" in methods.get(m, {})]  # fmt: skip
    if not cols:
        return []
    rows = []
    for name in names:
        row = [name, str(methods[cols[0]]["per_domain"].get(name, {}).get("total", "—"))]
        for m in cols:
            d = methods[m]["per_domain"].get(name)
            row.append("—" if d is None else f"{d['accuracy']:.3f} ({_ci(d)})")
        rows.append(row)
    drawn["accuracy_per_domain.png"] = lambda: plots.grouped_bars_png(
        names,
        {m: [methods[m]["per_domain"].get(n, {}).get("accuracy", 0.0) for n in names]
         for m in cols},
        "routing accuracy",
        "Routing accuracy per domain (test split)",
    )  # fmt: skip
    return [
        Block("h3", "Per domain"),
        Block("p", "Accuracy on each domain's own test sequences: where routing fails, and "
                   "for whom (with fewer sequences per domain, the intervals are wider)."),
        Block("table", header=["domain", "test sequences", *cols], rows=rows),
        Block("plot", "routing accuracy per domain", plot="accuracy_per_domain.png"),
    ]  # fmt: skip


def _misrouted_blocks(ev: dict[str, Any], per_pair: int = 3) -> list[Block]:
    wrong = ev.get("misrouted", [])
    if not wrong:
        return []
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for w in wrong:
        pairs.setdefault((w["domain"], w["chosen"]), []).append(w)
    ranked = sorted(pairs.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    examples = [[d, c, str(w["chunk"]), w.get("text", "")]
                for (d, c), ws in ranked for w in ws[:per_pair]]  # fmt: skip
    return [
        Block("h3", "Where routing fails"),
        Block("p", f"The {len(wrong)} test sequences {default_seqr(ev)} sent to another "
                   "domain's adapter, by pair (most frequent first), and the start of up to "
                   f"{per_pair} of each pair's sequences: a domain whose text also looks like "
                   "another's (documentation made of code examples, say) is routed by what it "
                   "looks like."),
        Block("table", header=["domain", "routed to", "sequences"],
              rows=[[d, c, str(len(ws))] for (d, c), ws in ranked]),
        Block("table", header=["domain", "routed to", "held-out chunk", "text (start)"],
              rows=examples),
    ]  # fmt: skip


def _significance_blocks(ev: dict[str, Any]) -> list[Block]:
    tests = ev.get("significance", [])
    if not tests:
        return []
    rows = [[t["first"], t["second"], str(t["first_only"]), str(t["second_only"]),
             f"{t['p_value']:.3g}"] for t in tests]  # fmt: skip
    return [
        Block("h3", "Paired tests (McNemar)"),
        Block("p", "On the same test sequences: how often only the first method was right, "
                   "how often only the second, and the exact two-sided p-value that the two "
                   "are equally accurate. p < 0.05: the difference is unlikely to be chance."),
        Block("table", header=["first", "second", "only first right", "only second right",
                               "p-value"], rows=rows),
    ]  # fmt: skip


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: report.json stays valid JSON
    (a loss can be NaN when a domain had no held-out text)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            lines += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b.rows]
            lines.append("")
        elif b.kind == "plot":
            lines += [f"![{b.text}]({b.plot})", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path, timing_rows: list[dict[str, Any]]) -> None:
    """report.json, report.md, report.html and the plots, each written atomically."""
    from seqr.sim.report_html import render_html

    out.mkdir(parents=True, exist_ok=True)
    content = dict(report)
    if timing_rows:
        content["timing_plot"] = lambda: plots.routing_time_png(
            timing_rows, "Routing time per token and module vs N"
        )
    blocks, drawn = build(content)
    images = {name: draw() for name, draw in drawn.items()}
    for name, png in images.items():
        write_atomic(out / name, png)
    saved = finite_json({**report, "plots": list(images)})
    write_atomic(out / "report.json", json.dumps(saved, indent=2, allow_nan=False).encode())
    write_atomic(out / "report.md", markdown(blocks).encode())
    write_atomic(out / "report.html", render_html(blocks, images).encode())
