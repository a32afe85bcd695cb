"""The simulation report: report.json, report.md and PNG plots people would rather look at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seqr.core.atomic_write import write_atomic

ACCURACY_ORDER = [
    "seqr_queries", "seqr_blend", "seqr_public", "seqr", "seqr_raw", "spectr", "brute_force",
    "arrow", "peft_arrow", "random",
]  # fmt: skip
LOSS_ORDER = [
    "oracle", "seqr_queries", "seqr_blend", "seqr_public", "seqr", "seqr_per_token", "seqr_raw",
    "arrow", "peft_arrow_per_token", "uniform_merge", "random", "base",
]  # fmt: skip


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: list[list[int]], names: list[str], title: str, path: Path) -> None:
    plt = _plt()
    size = max(4.0, 0.55 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="chosen adapter",
           ylabel="true domain", title=title)  # fmt: skip
    ax.set_xticklabels(names, rotation=60, ha="right")
    ax.set_yticklabels(names)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value:
                color = "white" if value > top / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(values: dict[str, float], ylabel: str, title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(values) + 2), 3.8))
    bars = ax.bar(list(values), list(values.values()), color="#4C72B0")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing_time(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({row["method"] for row in rows}):
        pts = sorted((row["n"], row["us_per_token"]) for row in rows if row["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="adapters N", ylabel="µs per token", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def selected_seqr(evaluation: dict[str, Any]) -> str:
    """The SEQR calibration chosen on validation (reports before the choice: "seqr")."""
    return str(evaluation.get("seqr_selected", "seqr"))


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The simulation issue's targets, each with the measured value and whether it is met."""
    ev, run = report["evaluation"], report.get("run", {})
    methods = ev["methods"]
    selected = selected_seqr(ev)
    seqr = methods.get(selected, {})
    out = []

    def add(name: str, value: float | None, met: bool | None) -> None:
        out.append({"target": name, "value": value, "met": met})

    acc = seqr.get("routing_accuracy")
    arrows = [methods[m]["routing_accuracy"] for m in ("arrow", "peft_arrow") if m in methods]
    add(f"SEQR ({selected}) routing accuracy >= 0.95", acc, None if acc is None else acc >= 0.95)
    best_arrow = max(arrows, default=None)
    add("SEQR accuracy >= ARROW's (ours and peft's)", best_arrow,
        None if acc is None or best_arrow is None else acc >= best_arrow)  # fmt: skip
    agree = ev.get("agreement_selected_brute_force")  # brute force under the same statistics
    add(f"SEQR ({selected}) choices identical to brute force (share)", agree, agree == 1.0)
    oracle, routed = methods.get("oracle", {}).get("heldout_loss"), seqr.get("heldout_loss")
    rel = None if oracle is None or routed is None else (routed - oracle) / oracle
    add("routed held-out loss within 2% of the oracle's", rel, None if rel is None else rel <= 0.02)
    wall = run.get("wall_seconds")
    limit = 300 if run.get("quick") else 3600
    add(f"wall time <= {limit} s", wall, None if wall is None else wall <= limit)
    return out


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    ev, run = report["evaluation"], report.get("run", {})
    methods = ev["methods"]
    lines = [
        "# seqr simulation report",
        "",
        f"{len(ev['adapters'])} clients, one private domain each: {', '.join(ev['adapters'])}.",
        f"Held-out: {ev['validation_sequences']} validation and {ev['test_sequences']} test "
        f"sequences of {ev['sequence_tokens']} tokens; settings chosen on validation only.",
        "",
    ]
    if run:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in run.items()] + [""]
    lines += [
        "## Routing accuracy (per sequence, test split)",
        "",
        "| method | accuracy | per-token accuracy | aggregation (chosen on validation) "
        "| routing ms / sequence |",
        "|---|---|---|---|---|",
    ]
    for name in [m for m in ACCURACY_ORDER if m in methods]:
        m = methods[name]
        if "routing_accuracy" not in m:
            continue
        ms = m.get("routing_seconds_per_sequence")
        lines.append(
            f"| {name} | {m['routing_accuracy']:.3f} | {_fmt(m.get('per_token_routing_accuracy'))}"
            f" | {m.get('aggregation', '—')} | {_fmt(None if ms is None else ms * 1e3, '.2f')} |"
        )
    lines += [
        "",
        f"SEQR calibration chosen on validation: {selected_seqr(ev)} "
        "(seqr: the adapters' own statistics; seqr_public: statistics the router measures on "
        "public reference text; seqr_blend: both z-scores averaged; seqr_queries: sequence-level "
        "statistics over unlabeled validation inputs, as over a router's own traffic).",
        "",
        f"SEQR and brute force chose the same adapter for "
        f"{ev['agreement_seqr_brute_force']:.1%} of test sequences "
        f"({ev['agreement_seqr_brute_force_per_token']:.1%} of tokens) with the adapters' own "
        f"statistics, and {ev['agreement_selected_brute_force']:.1%} of test sequences with "
        f"{selected_seqr(ev)}'s statistics.",
        "",
        "## Held-out loss (test split)",
        "",
        "| adapter choice | loss | perplexity | vs oracle |",
        "|---|---|---|---|",
    ]
    oracle = methods.get("oracle", {}).get("heldout_loss")
    for name in [m for m in LOSS_ORDER if m in methods and "heldout_loss" in methods[m]]:
        loss = methods[name]["heldout_loss"]
        rel = "—" if not oracle else f"{(loss - oracle) / oracle:+.2%}"
        lines.append(f"| {name} | {loss:.4f} | {methods[name]['perplexity']:.2f} | {rel} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report.get("targets", []):
        met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'], '.4g')} | {met} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in report.get("plots", [])]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path, timing_rows: list[dict[str, Any]]) -> None:
    """report.json, report.md and the plots, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    ev = report["evaluation"]
    methods, names = ev["methods"], ev["adapters"]
    selected = selected_seqr(ev)
    plots = {
        "confusion_seqr.png": lambda p: plot_confusion(
            methods[selected]["confusion"], names, f"SEQR ({selected}), test split", p
        ),
        "accuracy.png": lambda p: plot_bars(
            {
                m: methods[m]["routing_accuracy"]
                for m in ACCURACY_ORDER
                if "routing_accuracy" in methods.get(m, {})
            },
            "routing accuracy",
            "Per-sequence routing accuracy (test)",
            p,
        ),  # fmt: skip
        "loss.png": lambda p: plot_bars(
            {
                m: methods[m]["heldout_loss"]
                for m in LOSS_ORDER
                if "heldout_loss" in methods.get(m, {})
            },
            "cross-entropy",
            "Held-out loss by adapter choice (test)",
            p,
        ),  # fmt: skip
    }
    if timing_rows:
        plots["routing_time.png"] = lambda p: plot_routing_time(
            timing_rows, p, "Routing time per token and module vs N"
        )
    for name, draw in plots.items():
        draw(out / name)
    report = {**report, "plots": list(plots), "targets": targets(report)}
    write_atomic(out / "report.json", json.dumps(report, indent=2).encode())
    write_atomic(out / "report.md", markdown(report).encode())
