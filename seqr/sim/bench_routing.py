"""`seqr bench routing`: SEQR against SpectR, ARROW and brute force, measured in one run.

For every (N, d_in, r) it times routing per token, records the routers' working memory and
stored factors, and checks each router's argmax against brute force on the same tokens.
The machine's own float32 GEMM rate is measured in the same run, so every claim is a ratio
against a baseline taken under the same load (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from seqr import ArrowRouter, BruteForceRouter, SeqrRouter, SpectrRouter
from seqr.cli.help import DefaultsHelpFormatter
from seqr.core.device import check_device, device_name
from seqr.core.errors import ConfigError
from seqr.core.routing.base import Router

ROUTERS: dict[str, type[Router]] = {
    "seqr": SeqrRouter,
    "spectr": SpectrRouter,
    "arrow": ArrowRouter,
    "brute_force": BruteForceRouter,
}
TARGET = {"n": 1024, "d_in": 4096, "r": 16, "tokens": 1024}
# Targets from the foundation issue, as ratios measured in the same run.
SPEEDUP_TARGETS = {"spectr": 50.0, "arrow": 5.0, "brute_force": 200.0}
GEMM_SHARE_TARGET = 0.5
# A reference score gap below this share of the row's best score is a tie float32 may flip.
TIE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class RoutingBenchConfig:
    ns: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    d_ins: tuple[int, ...] = (576, 2048, 4096)
    ranks: tuple[int, ...] = (8, 16)
    tokens: int = 1024
    # Slow baselines at large N get fewer tokens so one call stays near this many MACs.
    macs_per_call: float = 4e10
    min_tokens: int = 32
    repeats: int = 3
    seed: int = 0
    device: str = "cpu"  # torch device the routers run on, e.g. "cuda"
    out: Path = field(default_factory=lambda: Path("runs/bench_routing"))

    def __post_init__(self) -> None:
        for name in ("ns", "d_ins", "ranks"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise ConfigError(f"{name} must be positive integers, got {values!r}")
        if self.tokens < 1 or self.min_tokens < 1 or self.repeats < 1:
            raise ConfigError("tokens, min_tokens and repeats must be >= 1")
        check_device(self.device, "RoutingBenchConfig.device")


def macs_per_token(method: str, n: int, d_in: int, r: int, d_out: int) -> int:
    """Multiply-adds per token and LoRA module, as in the SEQR paper's cost table."""
    return {
        "seqr": r * d_in + n * r * r,
        "spectr": n * r * d_in,
        "arrow": n * d_in,
        "brute_force": n * (r * d_in + d_out * r),
    }[method]


def _synchronize(device: str) -> None:
    """Wait for the device's queued kernels (GPU calls return before their work is done)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> float:
    """Minimum wall time over repeats, after one warm-up call (noise only ever adds time)."""
    fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The CPU profiler prints start/stop lines from C++ straight to fd 2; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_working_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak of memory torch allocates during fn (inputs and stored factors excluded).

    On a GPU: the CUDA allocator's peak above what was allocated before. On the CPU: walks
    the profiler's allocation (op self memory) and free ([memory]) events in time order;
    temporaries freed inside a single op are not seen, so this is a lower bound.
    """
    if torch.device(device).type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def gemm_rate(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The device's float32 matrix-multiply rate in FLOP/s (square GEMM)."""
    size = size if torch.device(device).type == "cpu" else 4 * size  # a GPU needs more work
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / best_time(lambda: a @ b, repeats, device)


def choice_agreement(reference_scores: torch.Tensor, choice: torch.Tensor) -> dict[str, Any]:
    """How often ``choice`` (T,) is the argmax of ``reference_scores`` (T, N), exact ties aside:
    a different choice counts only where the reference separates the two by more than
    TIE_TOLERANCE of the row's best score."""
    ref = reference_scores.double().cpu()
    choice = choice.cpu()
    best = ref.argmax(-1)
    gap = ref.gather(-1, best[:, None]) - ref.gather(-1, choice[:, None])
    real = (choice != best) & (gap[:, 0] > TIE_TOLERANCE * ref.abs().max(-1).values)
    return {"rows": int(len(choice)), "identical": int((choice == best).sum()),
            "differ_beyond_ties": int(real.sum())}  # fmt: skip


def make_library(n: int, d_in: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(n, d_in, r, generator=g) / r**0.5
    return A, B


def bench_point(
    n: int, d_in: int, r: int, cfg: RoutingBenchConfig, tokens: int | None = None
) -> list[dict[str, Any]]:
    A, B = (t.to(cfg.device) for t in make_library(n, d_in, r, cfg.seed))
    X = torch.randn(cfg.tokens, d_in, generator=torch.Generator().manual_seed(cfg.seed + 1))
    X = X.to(cfg.device)
    slowest = macs_per_token("brute_force", n, d_in, r, d_in)
    t_slow = tokens or min(cfg.tokens, max(cfg.min_tokens, int(cfg.macs_per_call // slowest)))
    X_slow = X[:t_slow]
    reference = BruteForceRouter(A, B)
    ref_norms = reference.norms(X_slow)
    rows = []
    for method, cls in ROUTERS.items():
        build_start = time.perf_counter()
        router = reference if method == "brute_force" else cls(A, B)
        build_s = time.perf_counter() - build_start
        macs = macs_per_token(method, n, d_in, r, d_in)
        t = tokens or (cfg.tokens if macs * cfg.tokens <= cfg.macs_per_call else t_slow)
        x = X[:t]
        seconds = best_time(functools.partial(router.route, x), cfg.repeats, cfg.device)
        agree = choice_agreement(ref_norms, router.route(X_slow)[:, 0])
        row = {
            "method": method,
            "n": n,
            "d_in": d_in,
            "r": r,
            "tokens": t,
            "seconds": seconds,
            "us_per_token": seconds / t * 1e6,
            "macs_per_token": macs,
            "gflops": 2 * macs * t / seconds / 1e9,
            "build_seconds": build_s,
            "state_bytes": sum(v.numel() * v.element_size() for v in router._factors.values())
            + (0 if router.shared_a is None else router.shared_a.numel() * 4),
            "peak_working_bytes": peak_working_bytes(
                functools.partial(router.route, x), cfg.device
            ),
            "agreement": agree["identical"] / agree["rows"],
            # Exact ties aside: a difference counts only where brute force separates the two.
            "agreement_ties_excluded": 1.0 - agree["differ_beyond_ties"] / agree["rows"],
        }
        if method == "seqr":
            rel = ((router.norms(X_slow) - ref_norms).abs() / ref_norms.clamp_min(1e-30)).max()
            row["max_rel_norm_error"] = rel.item()
        rows.append(row)
        del router
    return rows


def summarize_target(rows: list[dict[str, Any]], flops: float) -> dict[str, Any]:
    at = {
        row["method"]: row
        for row in rows
        if (row["n"], row["d_in"], row["r"]) == (TARGET["n"], TARGET["d_in"], TARGET["r"])
    }
    if "seqr" not in at:
        return {}
    seqr = at["seqr"]
    speedups = {m: at[m]["us_per_token"] / seqr["us_per_token"] for m in SPEEDUP_TARGETS if m in at}
    share = seqr["gflops"] * 1e9 / flops
    return {
        "config": {**TARGET, "tokens": seqr["tokens"]},
        "speedup_over": speedups,
        "speedup_targets": SPEEDUP_TARGETS,
        "gemm_share": share,
        "gemm_share_target": GEMM_SHARE_TARGET,
        "max_rel_norm_error": seqr["max_rel_norm_error"],
        "seqr_agreement_ties_excluded": seqr["agreement_ties_excluded"],
        "met": all(speedups[m] >= t for m, t in SPEEDUP_TARGETS.items() if m in speedups)
        and share >= GEMM_SHARE_TARGET
        and seqr["max_rel_norm_error"] <= 1e-4
        and seqr["agreement_ties_excluded"] == 1.0,
    }


def plot(rows: list[dict[str, Any]], path: Path, device: str = "CPU") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_ins = sorted({row["d_in"] for row in rows})
    ranks = sorted({row["r"] for row in rows})
    fig, axes = plt.subplots(
        len(d_ins), len(ranks), figsize=(5 * len(ranks), 3.6 * len(d_ins)), squeeze=False
    )
    for i, d_in in enumerate(d_ins):
        for j, r in enumerate(ranks):
            ax = axes[i][j]
            for method in ROUTERS:
                pts = sorted(
                    (row["n"], row["us_per_token"])
                    for row in rows
                    if (row["method"], row["d_in"], row["r"]) == (method, d_in, r)
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=method)
            ax.set(xscale="log", yscale="log", xlabel="adapters N", ylabel="µs per token")
            ax.set_title(f"d_in = {d_in}, r = {r}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"Routing time per token (float32, {device}, log-log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'N':>5} {'d_in':>5} {'r':>3} {'method':<12}{'us/token':>11}{'GFLOP/s':>9}"
    head += f"{'work MiB':>10}{'agree':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['n']:>5} {row['d_in']:>5} {row['r']:>3} {row['method']:<12}"
            f"{row['us_per_token']:>11.3f}{row['gflops']:>9.1f}"
            f"{row['peak_working_bytes'] / 2**20:>10.1f}{row['agreement_ties_excluded']:>8.3f}"
        )
    return "\n".join(lines)


def run(cfg: RoutingBenchConfig) -> dict[str, Any]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    flops = gemm_rate(device=cfg.device)
    name = device_name(cfg.device)
    grid = [(n, d, r) for d in cfg.d_ins for r in cfg.ranks for n in cfg.ns]
    rows: list[dict[str, Any]] = []
    for n, d_in, r in tqdm(grid, desc="routing bench", unit="config"):
        is_target = (n, d_in, r) == (TARGET["n"], TARGET["d_in"], TARGET["r"])
        # The target point routes all its tokens (at least the target's; more on a GPU, where
        # 1024 tokens time kernel launches rather than work).
        target_tokens = max(TARGET["tokens"], cfg.tokens)
        rows.extend(bench_point(n, d_in, r, cfg, target_tokens if is_target else None))
    # The GEMM rate again, so drift during the run is visible.
    flops_end = gemm_rate(device=cfg.device)
    result = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": cfg.device,
            "device_name": name,
            "threads": torch.get_num_threads(),
            "gemm_gflops_start": flops / 1e9,
            "gemm_gflops_end": flops_end / 1e9,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "results": rows,
        "target": summarize_target(rows, max(flops, flops_end)),
    }
    (cfg.out / "routing.json").write_text(json.dumps(result, indent=2))
    plot(rows, cfg.out / "routing.png", name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr bench routing", description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    d = RoutingBenchConfig
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench_routing"), help="folder for the results"
    )
    parser.add_argument(
        "--ns", type=int, nargs="+", default=list(d.ns), help="numbers of adapters N"
    )
    parser.add_argument(
        "--d-ins", type=int, nargs="+", default=list(d.d_ins), help="input widths of a module"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=list(d.ranks), help="LoRA ranks")
    parser.add_argument("--tokens", type=int, default=d.tokens, help="tokens routed per call")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed calls per case")
    parser.add_argument("--device", default=d.device, help="torch device, e.g. cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 is steadier on a shared, loaded machine",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = RoutingBenchConfig(
            ns=tuple(args.ns),
            d_ins=tuple(args.d_ins),
            ranks=tuple(args.ranks),
            tokens=args.tokens,
            repeats=args.repeats,
            device=args.device,
            out=args.out,
        )
    except ConfigError as exc:
        parser.error(str(exc))
    result = run(cfg)
    print(table(result["results"]))
    machine = result["machine"]
    print(
        f"\nfloat32 GEMM rate: {machine['gemm_gflops_start']:.1f} GFLOP/s at the start, "
        f"{machine['gemm_gflops_end']:.1f} at the end ({machine['threads']} threads)"
    )
    target = result["target"]
    if target:
        print(
            f"\nAt N={TARGET['n']}, d_in={TARGET['d_in']}, r={TARGET['r']}, "
            f"T={target['config']['tokens']}:"
        )
        for method, ratio in target["speedup_over"].items():
            goal = SPEEDUP_TARGETS[method]
            print(f"  SEQR is {ratio:8.1f}x faster than {method:<12}(target {goal:g}x)")
        print(f"  SEQR runs at {target['gemm_share']:.0%} of the GEMM rate (target 50%)")
        print(f"  max relative norm error vs brute force: {target['max_rel_norm_error']:.2e}")
        agreement = target["seqr_agreement_ties_excluded"]
        print(f"  argmax agreement with brute force (ties aside): {agreement:.2%}")
        print(f"  all targets met: {target['met']}")
    print(f"\nwrote {cfg.out / 'routing.json'} and {cfg.out / 'routing.png'}")
    return 0
