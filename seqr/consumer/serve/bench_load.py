"""One load level of ``seqr bench serve`` and its summary (bench.py runs the levels).

``run_level`` sends the same prompts from N client threads through the openai client, either
naming each prompt's adapter ("fixed") or asking for ``model="auto"``; ``summarize`` and
``compare`` turn the runs of one level into throughput (wall clock and per server
CPU-second), p50 / p99 latency, lost requests and auto's routing accuracy, and check auto /
fixed throughput against the target (bench_report.py).
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from seqr.consumer.serve.bench_report import TARGET, TARGET_LEVELS

if TYPE_CHECKING:
    from seqr.consumer.serve.bench import ServeBenchConfig

__all__ = ["run_level", "summarize", "compare"]


def run_level(
    client: Any,
    pairs: list[tuple[str, str]],
    clients: int,
    mode: str,
    cfg: ServeBenchConfig,
    server_cpu: Any = None,
) -> dict[str, Any]:
    """Requests from ``clients`` threads (cfg.requests_per_client each, at least
    cfg.min_requests in all); mode "auto" or "fixed"."""
    count = max(cfg.min_requests, cfg.requests_per_client * clients)
    jobs = [pairs[i % len(pairs)] for i in range(count)]
    latencies: list[float] = []
    chosen: list[tuple[str, str | None]] = []
    failures: list[str] = []
    tokens = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        for domain, prompt in jobs[k::clients]:
            started = time.perf_counter()
            try:
                out = client.completions.create(
                    model="auto" if mode == "auto" else domain,
                    prompt=prompt,
                    max_tokens=cfg.max_tokens,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
            except Exception as exc:  # noqa: BLE001 - a lost request is a result here
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += out.usage.completion_tokens
                chosen.append((domain, out.model_extra["seqr"]["adapter"]))

    cpu_before = server_cpu() if server_cpu else 0.0
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "server_cpu_s": (server_cpu() - cpu_before) if server_cpu else None,
        "tokens": tokens[0],
        "latencies": latencies,
        "chosen": chosen,
        "failures": failures,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    wall = sum(r["wall_s"] for r in runs)
    cpu = sum(r["server_cpu_s"] or 0.0 for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    latencies = [x for r in runs for x in r["latencies"]]
    chosen = [c for r in runs for c in r["chosen"]]
    return {
        "requests": sum(len(r["latencies"]) + len(r["failures"]) for r in runs),
        "lost": sum(len(r["failures"]) for r in runs),
        "failures": [f for r in runs for f in r["failures"]][:5],
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "per_repeat_tokens_per_s": [r["tokens"] / r["wall_s"] for r in runs],
        # Work per server CPU-second: what the routing pass costs, whatever else the machine
        # runs (wall-clock throughput on a shared machine moves with the other load).
        "server_cpu_s": round(cpu, 3),
        "tokens_per_server_cpu_s": tokens / cpu if cpu else None,
        "per_repeat_tokens_per_server_cpu_s": [
            r["tokens"] / r["server_cpu_s"] for r in runs if r["server_cpu_s"]
        ],
        "latency_p50_s": _quantile(latencies, 0.5),
        "latency_p99_s": _quantile(latencies, 0.99),
        "routed_to_domain": (sum(d == a for d, a in chosen) / len(chosen)) if chosen else None,
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def compare(clients: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One level: auto against fixed, in wall-clock and in server CPU time."""
    fixed, auto = summarize(runs["fixed"]), summarize(runs["auto"])
    ratio = _ratio(auto["tokens_per_s"], fixed["tokens_per_s"]) or 0.0
    cpu_ratio = _ratio(auto["tokens_per_server_cpu_s"], fixed["tokens_per_server_cpu_s"])
    pairs = zip(auto["per_repeat_tokens_per_s"], fixed["per_repeat_tokens_per_s"], strict=True)
    return {
        "clients": clients,
        "fixed": fixed,
        "auto": auto,
        "throughput_ratio": ratio,  # auto / fixed generated tokens per wall-clock second
        "paired_ratio_median": statistics.median(a / f for a, f in pairs),
        "cpu_ratio": cpu_ratio,  # auto / fixed generated tokens per server CPU-second
        "routing_overhead_cpu": None if cpu_ratio is None else 1 / cpu_ratio - 1,
        "latency_p50_ratio": _ratio(auto["latency_p50_s"], fixed["latency_p50_s"]),
        "meets_target": clients not in TARGET_LEVELS or ratio >= TARGET,
        "meets_target_cpu": clients not in TARGET_LEVELS or (cpu_ratio or 0.0) >= TARGET,
    }
