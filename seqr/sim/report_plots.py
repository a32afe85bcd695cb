"""The simulation report's plots, each drawn to PNG bytes (files for report.md, data: URIs
for report.html). Matplotlib's Agg backend: no display, no fonts fetched."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
           "#8C8C8C", "#CCB974", "#64B5CD")  # fmt: skip


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _plt()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def confusion_png(matrix: list[list[int]], names: Sequence[str], title: str) -> bytes:
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
    return _png(fig)


def accuracy_png(
    rows: Mapping[str, tuple[float, float, float]],
    title: str,
    ylabel: str = "routing accuracy (95% interval)",
) -> bytes:
    """Bars of accuracy with error bars: method -> (accuracy, low, high)."""
    plt = _plt()
    names = list(rows)
    values = [rows[n][0] for n in names]
    errors = [[v - rows[n][1] for n, v in zip(names, values, strict=True)],
              [rows[n][2] - v for n, v in zip(names, values, strict=True)]]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(names) + 2), 3.8))
    bars = ax.bar(names, values, yerr=errors, capsize=3, color=COLOURS[0])
    ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=6)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.08))
    ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def grouped_bars_png(
    groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str, title: str
) -> bytes:
    """One group of bars per domain (x), one bar per series (method)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.0))
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width=width, label=label, color=COLOURS[k % len(COLOURS)])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=40, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _png(fig)


def bars_png(values: Mapping[str, float], ylabel: str, title: str, fmt: str = "%.3f") -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(values) + 2), 3.8))
    bars = ax.bar(list(values), list(values.values()), color=COLOURS[0])
    ax.bar_label(bars, fmt=fmt, fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", rotation=30)
    return _png(fig)


def loss_curves_png(curves: Mapping[str, Sequence[Sequence[float]]]) -> bytes:
    """Training loss per step, one line per client."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (name, points) in enumerate(curves.items()):
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, label=name, color=COLOURS[k % len(COLOURS)], linewidth=1.2)
    ax.set(xlabel="training step", ylabel="training loss", title="Training loss per client")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def stages_png(stages: Sequence[Mapping[str, Any]]) -> bytes:
    """Horizontal bars: wall time of each stage of the run."""
    plt = _plt()
    names = [str(s["stage"]) for s in stages][::-1]
    seconds = [float(s["seconds"]) for s in stages][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    bars = ax.barh(names, seconds, color=COLOURS[0])
    ax.bar_label(bars, fmt="%.0f s", fontsize=8, padding=3)
    ax.set(xlabel="wall time (s)", title="Wall time per stage")
    return _png(fig)


def routing_time_png(rows: list[dict[str, Any]], title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({row["method"] for row in rows}):
        pts = sorted((row["n"], row["us_per_token"]) for row in rows if row["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="adapters N", ylabel="µs per token", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _png(fig)
