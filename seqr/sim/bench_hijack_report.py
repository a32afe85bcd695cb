"""What `seqr bench hijack` shows: the verdict and scenario table it prints and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def table(result: dict[str, Any]) -> str:
    lines = [f"{'adapter':<20}{'verdict':<10}reason", "-" * 60]
    for name, v in result["verdicts"].items():
        lines.append(f"{name:<20}{v['status']:<10}{v['reason'] or '-'}")
    head = f"\n{'scenario':<36}{'liar captures':>14}{'accuracy':>10}"
    lines += [head, "-" * len(head.strip())]
    for name, s in result["scenarios"].items():
        lines.append(f"{name:<36}{s['capture_share']:>14.1%}{s['accuracy']:>10.1%}")
    head = f"\n{'max-mean-z':>10}{'max-sigma-ratio':>16}{'bound liar captures':>21}  honest refused"
    lines += [head, "-" * len(head.strip())]
    n = len(result["config"]["honest"])
    for row in result["bound_sweep"]:
        lines.append(
            f"{row['max_mean_z']:>10.1f}{row['max_sigma_ratio']:>16.1f}"
            f"{row['bound_liar_capture_share']:>21.1%}  {len(row['honest_refused'])}/{n} "
            f"{' '.join(row['honest_refused'])}"
        )
    return "\n".join(lines)


def plot(scenarios: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scenarios)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    capture = [scenarios[n]["capture_share"] for n in names]
    accuracy = [scenarios[n]["accuracy"] for n in names]
    bars = [
        ax.bar(x - 0.2, capture, 0.4, label="honest sequences captured by the liar",
               color="#c0392b"),
        ax.bar(x + 0.2, accuracy, 0.4, label="routed to their own domain", color="#2e86c1"),
    ]  # fmt: skip
    for group in bars:
        ax.bar_label(group, labels=[f"{h.get_height():.0%}" for h in group], fontsize=8)
    ax.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set(ylim=(0, 1.3), ylabel="share of honest held-out sequences")
    ax.set_title("Routing hijack by falsified statistics or crafted weights")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
