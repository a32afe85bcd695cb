"""`seqr bench device`: routing on another torch device (a GPU) chooses what the CPU chooses.

Everything a consumer routes with runs on ``--device`` and on the CPU from the same weights,
and the choices are compared (a difference only counts where the CPU's own scores separate
the two adapters by more than float32 rounding):

1. routers: SEQR, SpectR, ARROW and brute force on one random library, inputs in float32 and
   bfloat16: each against the same router on the CPU, and the exact ones (SEQR, SpectR,
   brute force) against brute force in float64 on the CPU, with SEQR's largest relative norm
   error;
2. a routed model (the synthetic library of seqr.sim.synthetic_library): per-sequence choices
   and decision scores, the bfloat16 first pass, query statistics (the default calibration)
   measured on the device and the choices under them, per-token routing's logits, and routed
   greedy generation.

Exit status 1 when any choice differs beyond ties (generated tokens are reported, not judged:
one near-tie early changes every token after it). Timing is `seqr bench routing --device`'s
job.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seqr.cli.help import DefaultsHelpFormatter
from seqr.core.device import check_device, device_name
from seqr.core.errors import ConfigError
from seqr.core.model_routing import ModelRoutingConfig, RoutedModel, reference_statistics
from seqr.core.routing import BruteForceRouter
from seqr.sim.bench_routing import ROUTERS, choice_agreement, make_library
from seqr.sim.synthetic_library import synthetic_workload, token_range

EXACT = ("seqr", "spectr", "brute_force")


@dataclass(frozen=True)
class DeviceBenchConfig:
    device: str = "cuda"
    # The router library: N adapters, module width d_in, rank r, tokens routed.
    n: int = 64
    d_in: int = 576
    r: int = 8
    tokens: int = 4096
    # The routed model: None = SmolLM2 if installed, else a tiny Llama; or a config.json.
    base_model: str | None = None
    adapters: int = 4
    rank: int = 8
    batch: int = 8
    prompt_tokens: int = 32
    pool: int = 32  # unlabeled sequences the query statistics are measured on
    new_tokens: int = 16
    seed: int = 0
    out: Path = field(default_factory=lambda: Path("runs/bench_device"))

    def __post_init__(self) -> None:
        for name in ("n", "d_in", "r", "tokens", "adapters", "rank", "batch", "prompt_tokens",
                     "pool", "new_tokens"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"DeviceBenchConfig.{name} = {value!r} must be an integer >= 1")
        if self.adapters < 2 or self.n < 2:
            raise ConfigError("DeviceBenchConfig needs at least 2 adapters to choose between")
        check_device(self.device, "DeviceBenchConfig.device")


def check_routers(cfg: DeviceBenchConfig) -> list[dict[str, Any]]:
    A, B = make_library(cfg.n, cfg.d_in, cfg.r, cfg.seed)
    X = torch.randn(cfg.tokens, cfg.d_in, generator=torch.Generator().manual_seed(cfg.seed + 1))
    exact64 = BruteForceRouter(A.double(), B.double())
    rows = []
    for method, cls in ROUTERS.items():
        on_cpu, on_device = cls(A, B), cls(A.to(cfg.device), B.to(cfg.device))
        for dtype in (torch.float32, torch.bfloat16):
            x = X.to(dtype)
            device_norms = on_device.norms(x.to(cfg.device)).float().cpu()
            cpu_choice = choice_agreement(on_cpu.norms(x), device_norms.argmax(-1))
            row: dict[str, Any] = {
                "method": method,
                "input": str(dtype).removeprefix("torch."),
                "vs_cpu": cpu_choice,
            }
            if method in EXACT:
                truth = exact64.norms(x.double())
                row["vs_float64_brute_force"] = choice_agreement(truth, device_norms.argmax(-1))
                rel = (device_norms.double() - truth).abs() / truth.clamp_min(1e-30)
                row["max_rel_norm_error"] = float(rel.max())
            rows.append(row)
    return rows


def _pool(cfg: DeviceBenchConfig, vocab: int) -> torch.Tensor:
    """Unlabeled traffic for query statistics: sequences from every adapter's token range."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    rows = []
    for j in range(cfg.pool):
        low, high = token_range(vocab, j % cfg.adapters, cfg.adapters)
        rows.append(torch.randint(low, high, (cfg.prompt_tokens,), generator=g))
    return torch.stack(rows)


@torch.no_grad()
def check_model(cfg: DeviceBenchConfig) -> dict[str, Any]:
    work = synthetic_workload(replace(cfg, device="cpu"))
    names = work.routed.adapters
    cpu_model = work.routed.peft_model
    dev_model = copy.deepcopy(cpu_model).to(cfg.device)
    ids, mask = work.input_ids, work.attention_mask
    dev = {"input_ids": ids.to(cfg.device), "attention_mask": mask.to(cfg.device)}

    def routed(model: Any, stats: Any, **config: Any) -> RoutedModel:
        return RoutedModel(model, ModelRoutingConfig(**config), adapters=names, stats=stats)

    out: dict[str, Any] = {"model": work.model, "adapters": len(names), "batch": len(ids)}
    # Per-sequence routing with the adapters' own statistics, fp32 and bf16 first passes.
    own = work.routed.stats
    cpu_decision = routed(cpu_model, own).route_sequences(ids, mask)
    for key, config in (("fp32", {}), ("bf16", {"first_pass_dtype": "bfloat16"})):
        decision = routed(dev_model, own, **config).route_sequences(**dev)
        out[f"per_sequence_{key}"] = {
            **choice_agreement(cpu_decision.scores, decision.indices),
            "max_abs_score_difference": float(
                (decision.scores.float().cpu() - cpu_decision.scores.float()).abs().max()
            ),
        }
    out["adapters_chosen_on_cpu"] = len(set(cpu_decision.indices.tolist()))
    # Query statistics, measured on each side from the same unlabeled pool.
    pool = _pool(cfg, int(cpu_model.get_base_model().config.vocab_size))
    queries = {
        "cpu": reference_statistics(cpu_model, names, [pool], per_sequence=True),
        "device": reference_statistics(dev_model, names, [pool.to(cfg.device)], per_sequence=True),
    }
    rel = max(
        float(np.max(np.abs(d.mean - c.mean) / np.maximum(c.std, 1e-12)))
        for a in names
        for c, d in zip(
            queries["cpu"][a].modules.values(), queries["device"][a].modules.values(), strict=True
        )
    )
    cpu_q = routed(cpu_model, queries["cpu"]).route_sequences(ids, mask)
    dev_q = routed(dev_model, queries["device"]).route_sequences(**dev)
    out["query_statistics"] = {**choice_agreement(cpu_q.scores, dev_q.indices),
                               "max_mean_difference_in_stds": rel}  # fmt: skip
    # Per-token routing (top 2 of every module, every token): the next-token argmax.
    cpu_logits = routed(cpu_model, own, mode="per_token", top_k=2)(ids, mask).logits
    dev_logits = routed(dev_model, own, mode="per_token", top_k=2)(**dev).logits.float().cpu()
    valid = mask.bool()
    out["per_token_next_token"] = {
        **choice_agreement(cpu_logits[valid], dev_logits[valid].argmax(-1)),
        "max_abs_logit_difference": float((dev_logits - cpu_logits).abs().max()),
    }
    # Routed greedy generation: the same tokens?
    gen = {"max_new_tokens": cfg.new_tokens, "min_new_tokens": cfg.new_tokens,
           "do_sample": False, "pad_token_id": work.pad_token_id}  # fmt: skip
    cpu_tokens = routed(cpu_model, own).generate(ids, mask, **gen)[:, ids.shape[1] :]
    dev_tokens = routed(dev_model, own).generate(dev["input_ids"], dev["attention_mask"], **gen)
    dev_tokens = dev_tokens[:, ids.shape[1] :].cpu()
    same = cpu_tokens == dev_tokens
    out["generation"] = {"tokens": int(same.numel()), "identical": int(same.sum()),
                         "identical_sequences": int(same.all(1).sum())}  # fmt: skip
    return out


def differences(result: dict[str, Any]) -> list[str]:
    """Every check whose choices differ beyond ties, by name ([] when all agree)."""
    found = []
    for row in result["routers"]:
        for key in ("vs_cpu", "vs_float64_brute_force"):
            if row.get(key, {}).get("differ_beyond_ties", 0):
                found.append(f"{row['method']} ({row['input']} input) {key}")
    for key, check in result["model"].items():
        if isinstance(check, dict) and check.get("differ_beyond_ties", 0):
            found.append(key)
    return found


def run(cfg: DeviceBenchConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    result: dict[str, Any] = {
        "device": cfg.device,
        "device_name": device_name(cfg.device),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "routers": check_routers(cfg),
        "model": check_model(cfg),
    }
    result["differences"] = differences(result)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "device.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"{result['device']} ({result['device_name']}) against the CPU:"]
    for row in result["routers"]:
        vs = row["vs_cpu"]
        line = f"  {row['method']:<12}{row['input']:<9} same choice {vs['identical']}/{vs['rows']}"
        if "vs_float64_brute_force" in row:
            exact = row["vs_float64_brute_force"]
            line += (f", vs float64 brute force {exact['identical']}/{exact['rows']}"
                     f" (max rel. norm error {row['max_rel_norm_error']:.1e})")  # fmt: skip
        lines.append(line)
    for key, check in result["model"].items():
        if isinstance(check, dict):
            total = check.get("rows", check.get("tokens"))
            lines.append(f"  {key:<24} identical {check['identical']}/{total}")
    differ = result["differences"]
    lines.append("choices differ beyond ties: " + (", ".join(differ) if differ else "none"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seqr bench device", description=__doc__,
                                formatter_class=DefaultsHelpFormatter)  # fmt: skip
    d = DeviceBenchConfig
    p.add_argument("--device", default=d.device, help="torch device to check, e.g. cuda")
    p.add_argument("--base-model", default=None,
                   help="routed model: SmolLM2 if installed, tiny, a model folder, or a "
                   "config.json (that architecture with random weights)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens routed per router")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--out", type=Path, default=Path("runs/bench_device"), help="results folder")
    args = p.parse_args(argv)
    try:
        cfg = DeviceBenchConfig(device=args.device, base_model=args.base_model,
                                tokens=args.tokens, new_tokens=args.new_tokens, seed=args.seed,
                                out=args.out)  # fmt: skip
    except ConfigError as exc:
        p.error(str(exc))
    result = run(cfg)
    print(summary(result))
    return 1 if result["differences"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
