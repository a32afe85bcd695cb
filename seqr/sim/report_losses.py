"""The report's held-out loss section: each way of choosing an adapter against the oracle,
per domain, and the routing mistakes judged by the text's own loss."""

from __future__ import annotations

from typing import Any

from seqr.sim import report_plots as plots
from seqr.sim.report import LOSS_ORDER, METHOD_NOTES, Block, default_seqr


def loss_section(ev: dict[str, Any], drawn: dict) -> list[Block]:
    methods, names, sel = ev["methods"], ev["adapters"], default_seqr(ev)
    oracle = methods.get("oracle", {}).get("heldout_loss")
    shown = [m for m in LOSS_ORDER if "heldout_loss" in methods.get(m, {})]
    if not shown:
        return []
    rows = []
    for name in shown:
        loss = methods[name]["heldout_loss"]
        rel = "—" if not oracle else f"{(loss - oracle) / oracle:+.2%}"
        rows.append([name, METHOD_NOTES.get(name, ""), f"{loss:.4f}",
                     f"{methods[name]['perplexity']:.2f}", rel])  # fmt: skip
    blocks = [
        Block("h2", "Held-out loss (test split)"),
        Block("p", "Next-token cross-entropy on the test sequences with each way of choosing "
                   "an adapter: routing is as good as its loss is close to the oracle's (the "
                   "true domain's adapter), and worth it as far as it beats the base model and "
                   "the merge of all adapters."),
        Block("table", header=["adapter choice", "what", "loss", "perplexity", "vs oracle"],
              rows=rows),
    ]  # fmt: skip
    blocks += _mistake_blocks(methods, shown)
    per_domain = {m: methods[m].get("heldout_loss_per_domain", {}) for m in ("oracle", sel)}
    if all(per_domain.values()):
        routed, best = per_domain[sel], per_domain["oracle"]
        rows = [[n, f"{best[n]:.4f}", f"{routed[n]:.4f}", f"{(routed[n] - best[n]) / best[n]:+.2%}"]
                for n in names if n in best and n in routed]  # fmt: skip
        drawn["loss_per_domain.png"] = lambda: plots.grouped_bars_png(
            [r[0] for r in rows], {"oracle": [best[r[0]] for r in rows],
                                   f"routed ({sel})": [routed[r[0]] for r in rows]},
            "cross-entropy", "Routed vs oracle held-out loss per domain",
        )  # fmt: skip
        blocks += [
            Block("h3", "Routed vs oracle loss per domain"),
            Block("p", "A routing mistake costs loss only where the chosen adapter is worse on "
                       "that text than the right one; this is where routing costs quality."),
            Block("table", header=["domain", "oracle loss", f"routed ({sel})", "difference"],
                  rows=rows),
            Block("plot", "routed vs oracle loss per domain", plot="loss_per_domain.png"),
        ]  # fmt: skip
    return blocks


def _mistake_blocks(methods: dict[str, Any], shown: list[str]) -> list[Block]:
    rows = []
    for name in shown:
        m = methods[name].get("mistake_losses")
        if m and m["rows"]:
            rows.append([name, str(m["rows"]), str(m["chosen_lower"]),
                         f"{m['chosen_loss']:.4f}", f"{m['labelled_loss']:.4f}"])  # fmt: skip
    if not rows:
        return []
    return [
        Block("h3", "Routing mistakes, by the text's own loss"),
        Block("p", "On the test sequences a method sent to another domain's adapter: on how "
                   "many that adapter predicts the text better than its own domain's adapter "
                   "(a mistake only by the labels), and both mean losses. Where the chosen "
                   "adapter is rarely better, accuracy measures real mistakes."),
        Block("table", header=["adapter choice", "mistakes", "chosen adapter's loss lower",
                               "loss, chosen", "loss, own domain's adapter"], rows=rows),
    ]  # fmt: skip
