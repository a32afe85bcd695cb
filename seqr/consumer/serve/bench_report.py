"""What ``seqr bench serve`` shows people: a Markdown table and a PNG of its JSON document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGET = 0.9  # auto throughput / fixed throughput at 8 and 32 clients (issue 17)
TARGET_LEVELS = (8, 32)


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(doc: dict[str, Any]) -> str:
    rows = [
        "| clients | fixed tok/s | auto tok/s | auto/fixed | auto/fixed per server CPU-s | "
        "p50 fixed / auto (s) | p99 fixed / auto (s) | lost | auto = domain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in doc["levels"].values():
        f, a = v["fixed"], v["auto"]
        rows.append(
            f"| {v['clients']} | {f['tokens_per_s']:.1f} | {a['tokens_per_s']:.1f} | "
            f"{v['throughput_ratio']:.3f} | {_num(v['cpu_ratio'], 3)} | "
            f"{_num(f['latency_p50_s'], 2)} / "
            f"{_num(a['latency_p50_s'], 2)} | {_num(f['latency_p99_s'], 2)} / "
            f"{_num(a['latency_p99_s'], 2)} | {f['lost'] + a['lost']} | "
            f"{_num(a['routed_to_domain'], 2)} |"
        )
    return "\n".join(rows)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput per level (named adapter vs auto, with the ratio) and p50 / p99 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(doc["levels"].values())
    xs = list(range(len(levels)))
    labels = [str(v["clients"]) for v in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    colors = {"fixed": "tab:blue", "auto": "tab:orange"}
    for offset, mode in ((-width / 2, "fixed"), (width / 2, "auto")):
        label = "named adapter" if mode == "fixed" else "auto (SEQR routed)"
        left.bar(
            [x + offset for x in xs],
            [v[mode]["tokens_per_s"] for v in levels],
            width,
            label=label,
            color=colors[mode],
        )
        right.plot(
            labels,
            [v[mode]["latency_p50_s"] for v in levels],
            marker="o",
            color=colors[mode],
            label=f"{label} p50",
        )
        right.plot(
            labels,
            [v[mode]["latency_p99_s"] for v in levels],
            marker="x",
            linestyle="--",
            color=colors[mode],
            label=f"{label} p99",
        )
    for x, v in zip(xs, levels, strict=True):
        top = max(v["fixed"]["tokens_per_s"], v["auto"]["tokens_per_s"])
        left.annotate(f"{v['throughput_ratio']:.2f}x", (x, top), ha="center", va="bottom")
    left.set_xticks(xs, labels)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("generated tokens / s")
    left.set_title(f"throughput, auto / fixed (target >= {TARGET} at 8, 32)")
    left.legend()
    right.set_xlabel("concurrent clients")
    right.set_ylabel("request latency (s)")
    right.set_title("latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
