"""The report of ``seqr simulate groups`` (groups_eval.py runs it): report.json and report.md.

Held-out losses of the group adapter against the centrally trained reference and the
local-only adapters, bytes per round and client (B only; A is never sent), the privacy spent,
the group's entry as the client audit saw it, and SEQR routing accuracy.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seqr.sim.groups_eval import GroupsEvalConfig

__all__ = ["write_report"]


def write_report(cfg, flower, audit, summary, losses, routing, n_held) -> dict[str, Any]:
    """report.json and report.md in ``cfg.out``: losses against the targets, the
    communication per round and client, privacy, the group's audited entry and routing."""
    local = [v for k, v in losses.items() if k.startswith("local_")]
    group, central = losses["group"], losses["central"]
    entry = next(e for e in audit.entries if e.name == cfg.domain)
    rounds = summary["rounds"]
    b = summary["b_bytes"]
    report = {
        "losses": losses,
        "heldout_sequences": n_held,
        "targets": {
            "group_vs_central_relative": (group - central) / central,
            "group_within_1pct_of_central": (group - central) / central <= 0.01,
            "local_mean": sum(local) / len(local),
            "group_better_than_local_mean": group < sum(local) / len(local),
        },
        "communication": {
            "b_bytes": b,
            "a_bytes_never_sent": summary["a_bytes"],
            "per_round": [
                {
                    "round": r["round"],
                    "down_per_client": r["bytes_down_per_client"],
                    "up_per_client": r["bytes_up_per_client"],
                    "flower_array_bytes_down": r["array_record_bytes_down"],
                    "train_loss": r["train_loss"],
                    "epsilon": r["epsilon"],
                }
                for r in rounds
            ],  # fmt: skip
            "every_round_is_b_only": all(
                r["bytes_down_per_client"] == b and set(r["bytes_up_per_client"].values()) == {b}
                for r in rounds
            ),  # fmt: skip
        },
        "privacy": summary["privacy"],
        "group": {
            "status": summary["status"],
            "contributors": list(entry.contributors),
            "examples_by_client": dict(entry.examples_by_client or {}),
            "rounds": entry.group_rounds,
            "seconds": summary["seconds"],
            "clients_heldout_loss": summary["heldout_loss"],
        },  # fmt: skip
        "routing": {
            m: v["routing_accuracy"]
            for m, v in routing["methods"].items()
            if "routing_accuracy" in v
        },  # fmt: skip
        "routing_adapters": routing["adapters"],
        "routing_confusion_seqr": routing["methods"]["seqr"]["confusion"],
        "audit": {"version": audit.version, "entries": len(audit.entries)},
        "federation_seconds": round(flower["seconds"], 1),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "report.json").write_text(json.dumps(report, indent=2))
    (cfg.out / "report.md").write_text(_markdown(cfg, report))
    return report


def _markdown(cfg: GroupsEvalConfig, r: dict[str, Any]) -> str:
    t, c = r["targets"], r["communication"]
    rows = "\n".join(
        f"| {k} | {v:.4f} |" for k, v in sorted(r["losses"].items(), key=lambda x: x[1])
    )
    comm = "\n".join(
        f"| {x['round']} | {x['down_per_client']} | {sorted(set(x['up_per_client'].values()))} "
        f"| {x['flower_array_bytes_down']} | {x['train_loss']:.4f} |"
        for x in c["per_round"]
    )
    routing = ", ".join(f"{m} {v:.3f}" for m, v in r["routing"].items())
    return (
        f"# Task group: {cfg.domain} split across {cfg.clients} clients\n\n"
        f"{cfg.rounds} rounds x {cfg.local_steps} local steps, {cfg.aggregation}, "
        f"DP: {r['privacy']}.\n"
        f"Base model {cfg.base_model}, sequences of {cfg.seq_len} tokens, batch {cfg.batch_size} "
        f"per client (central reference: batch {cfg.batch_size * cfg.clients}, "
        f"{cfg.steps} steps on the pooled parts).\n\n"
        f"## Held-out loss on the domain's held-out text ({r['heldout_sequences']} sequences)\n\n"
        f"| adapter | loss |\n|---|---|\n{rows}\n\n"
        f"group vs central: {100 * t['group_vs_central_relative']:+.2f}% "
        f"(target within 1%: {'met' if t['group_within_1pct_of_central'] else 'NOT met'}); "
        f"mean of local-only adapters {t['local_mean']:.4f} "
        f"(group better: {'yes' if t['group_better_than_local_mean'] else 'NO'}).\n\n"
        f"## Communication per client and round\n\nB alone is {c['b_bytes']} bytes "
        f"(the shared A, {c['a_bytes_never_sent']} bytes, is never sent).\n\n"
        f"| round | bytes down | bytes up | Flower array bytes down | mean train loss |\n"
        f"|---|---|---|---|---|\n{comm}\n\n"
        f"## Routing with the audited registry (group + single-client adapters)\n\n"
        f"Adapters: {', '.join(r['routing_adapters'])}. Test accuracy: {routing}.\n\n"
        f"Contributors of the group adapter (signed, audited): "
        f"{', '.join(r['group']['contributors'])}.\n"
    )
