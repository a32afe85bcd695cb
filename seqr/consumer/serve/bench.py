"""``seqr bench serve``: what routing every request costs a running ``seqr serve``.

The server runs as its own process (``seqr serve`` on a free loopback port), so the clients'
HTTP work does not share its interpreter. For each number of concurrent clients (1, 8, 32) the
same prompts (held-out text of each adapter's domain) are sent through the official openai client
twice: with the right adapter named (the fixed-adapter baseline) and with ``model="auto"``, in
ABBA order over the repeats so that drift on a shared machine hits both alike. Every request
generates exactly ``max_tokens`` tokens (``ignore_eos``, greedy), so both modes do the same
decoding work and differ only by the routing pass. Reported per level: throughput (generated
tokens / s), p50 / p99 latency, auto / fixed throughput (target >= 0.9 at 8 and 32 clients),
lost requests (target 0) and auto's routing accuracy against the domain labels, as JSON,
Markdown and PNG (bench_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seqr.cli.help import CACHE_DIR_HELP, CONSUMER_BASE_MODEL_HELP, RawDefaultsHelpFormatter
from seqr.consumer.config import ROUTING_PASSES, RoutingPass, native_bf16
from seqr.consumer.serve.bench_load import compare, run_level
from seqr.consumer.serve.bench_report import TARGET, TARGET_LEVELS, plot, table
from seqr.core.errors import ConfigError, DataError

TRAIN_SEQ_LEN = 128  # the federation's chunk length: held-out chunks are the evaluation's


@dataclass(frozen=True)
class ServeBenchConfig:
    registry: Path
    data: Path = Path("data/domains")  # one folder of text per adapter name
    base_model: str | None = None
    cache_dir: str | None = None
    clients: tuple[int, ...] = (1, 8, 32)
    requests_per_client: int = 4  # per level, mode and repeat: this many per client ...
    min_requests: int = 16  # ... and at least this many (p50 / p99 need some)
    max_tokens: int = 32  # generated per request, exactly
    prompt_tokens: int = 64  # held-out tokens per prompt
    repeats: int = 2  # fixed/auto pairs per level, ABBA order
    threads: int = 0  # the server's torch threads (0: torch's default)
    routing_pass: RoutingPass = "auto"  # the server's routing pass (seqr serve --routing-pass)
    out: Path = field(default_factory=lambda: Path("runs/bench_serve"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", tuple(self.clients))
        values = [
            *self.clients,
            self.requests_per_client,
            self.min_requests,
            self.max_tokens,
            self.prompt_tokens,
            self.repeats,
        ]
        if not self.clients or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
        ):
            raise ConfigError(
                "ServeBenchConfig: clients, requests_per_client, min_requests, max_tokens, "
                f"prompt_tokens and repeats must be integers >= 1; got {self.clients}, "
                f"{self.requests_per_client}, {self.min_requests}, "
                f"{self.max_tokens}, {self.prompt_tokens}, {self.repeats}"
            )
        if self.threads < 0:
            raise ConfigError(f"ServeBenchConfig.threads = {self.threads} must be >= 0")


def held_out_prompts(
    cfg: ServeBenchConfig, names: list[str], tokenizer: Any
) -> list[tuple[str, str]]:
    """(adapter name, prompt) pairs, domains interleaved: the first ``prompt_tokens`` tokens of
    held-out chunks of each adapter's folder under ``data`` (the evaluation's split)."""
    from seqr.core.textdata import load_text_data

    per_domain: dict[str, list[str]] = {}
    for name in names:
        folder = cfg.data / name
        if not folder.is_dir():
            continue
        data = load_text_data(
            folder, tokenizer, seq_len=TRAIN_SEQ_LEN, heldout_fraction=0.1, seed=0
        )
        chunks = data.heldout if len(data.heldout) else data.train
        per_domain[name] = [tokenizer.decode(c[: cfg.prompt_tokens].tolist()) for c in chunks]
    if not per_domain:
        raise DataError(
            f"none of the adapters {names} has a text folder under {cfg.data}; give --data with "
            "one subfolder per adapter name (the simulation's data/domains)"
        )
    pairs: list[tuple[str, str]] = []
    for i in range(max(len(v) for v in per_domain.values())):
        pairs += [(name, texts[i]) for name, texts in per_domain.items() if i < len(texts)]
    return pairs


class ServerProcess:
    """``seqr serve`` in a child process on a free loopback port."""

    def __init__(self, cfg: ServeBenchConfig) -> None:
        args = [
            sys.executable,
            "-m",
            "seqr.cli.main",
            "serve",
            "--registry",
            str(cfg.registry),
            "--port",
            "0",
            "--max-batch",
            str(max(cfg.clients)),
            "--queue-size",
            str(max(64, 4 * max(cfg.clients))),
            "--max-tokens",
            str(cfg.max_tokens),
            "--max-prompt-tokens",
            str(max(256, 2 * cfg.prompt_tokens)),
            "--threads",
            str(cfg.threads),
            "--log-level",
            "warning",
        ]
        if cfg.base_model:
            args += ["--base-model", cfg.base_model]
        if cfg.cache_dir:
            args += ["--cache-dir", cfg.cache_dir]
        args += ["--routing-pass", cfg.routing_pass]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("listening on "):
                self.url = line.split()[2]
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise DataError(f"seqr serve did not start:\n{''.join(self.lines[-20:])}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def _drain(self) -> None:
        self.lines.extend(self.proc.stdout or [])

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def run(cfg: ServeBenchConfig) -> dict[str, Any]:
    import httpx
    import openai
    from transformers import AutoTokenizer

    from seqr.core.base_model import resolve_model_dir
    from seqr.core.federation import DEFAULT_BASE_MODEL
    from seqr.registry import audit_registry

    names = [e.name for e in audit_registry(cfg.registry).report.entries]
    folder = resolve_model_dir(cfg.base_model or DEFAULT_BASE_MODEL, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pairs = held_out_prompts(cfg, names, tokenizer)
    print(
        f"{len(pairs)} held-out prompts over {len({d for d, _ in pairs})} adapters; "
        f"starting seqr serve",
        flush=True,
    )
    server = ServerProcess(cfg)
    levels: dict[str, Any] = {}
    try:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600
        )
        for domain, prompt in pairs[: len(names)]:  # warm-up: every adapter and the router
            for model in (domain, "auto"):
                client.completions.create(model=model, prompt=prompt, max_tokens=2)
        for clients in cfg.clients:
            runs: dict[str, list[dict[str, Any]]] = {"fixed": [], "auto": []}
            order = [
                m
                for r in range(cfg.repeats)
                for m in (("fixed", "auto") if r % 2 == 0 else ("auto", "fixed"))
            ]
            for mode in order:
                result = run_level(client, pairs, clients, mode, cfg, server.cpu_seconds)
                runs[mode].append(result)
                print(
                    f"clients {clients:3d} {mode:5s}: {result['tokens'] / result['wall_s']:8.1f} "
                    f"tokens/s, {len(result['failures'])} lost",
                    flush=True,
                )
            levels[str(clients)] = compare(clients, runs)
        health = httpx.get(f"{server.url}/health", timeout=60).json()
        metrics = httpx.get(f"{server.url}/metrics", timeout=60).text
        load_s = next(
            (
                float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith("seqr_registry_load_seconds ")
            ),
            None,
        )
    finally:
        code = server.stop()
    lost = sum(level[m]["lost"] for level in levels.values() for m in ("fixed", "auto"))
    doc = {
        "benchmark": "seqr bench serve",
        "registry": str(cfg.registry),
        "adapters": names,
        "prompts": len(pairs),
        "calibration_at_end": health.get("calibration"),
        "registry_load_seconds": load_s,  # audit + load of the served version at start
        "levels": levels,
        "lost_requests": lost,
        "target": {
            "auto_over_fixed_throughput": TARGET,
            "at_clients": list(TARGET_LEVELS),
            "lost_requests": 0,
        },
        "meets_target": lost == 0 and all(v["meets_target"] for v in levels.values()),
        "meets_target_cpu": lost == 0 and all(v["meets_target_cpu"] for v in levels.values()),
        "server_exit_code": code,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": _load(),
            "native_bf16": native_bf16(),  # what --routing-pass auto chose by (bfloat16 if so)
        },
        "config": {k: str(v) for k, v in asdict(cfg).items()},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "bench_serve.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    plot(doc, cfg.out / "bench_serve.png")
    (cfg.out / "bench_serve.md").write_text(table(doc) + "\n", encoding="utf-8")
    return doc


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="seqr bench serve",
        description=__doc__,
        formatter_class=RawDefaultsHelpFormatter,
    )
    p.add_argument(
        "--registry", type=Path, required=True, metavar="DIR", help="registry folder to serve"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("data/domains"),
        help="one folder of text per adapter name (held-out chunks become prompts)",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help=CONSUMER_BASE_MODEL_HELP,
    )
    p.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument(
        "--requests-per-client",
        type=int,
        default=4,
        help="per level, mode and repeat (at least --min-requests in all)",
    )
    p.add_argument(
        "--min-requests", type=int, default=16, help="requests per level, mode and repeat, at least"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="generated per request, exactly")
    p.add_argument("--prompt-tokens", type=int, default=64, help="held-out tokens per prompt")
    p.add_argument(
        "--repeats", type=int, default=2, help="fixed/auto pairs per level, in ABBA order"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="the server's torch threads (0: torch's default)"
    )
    p.add_argument(
        "--routing-pass",
        choices=ROUTING_PASSES,
        default="auto",
        help="the server's routing pass dtype (seqr serve --routing-pass)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/bench_serve"), help="folder for the results"
    )
    args = p.parse_args(argv)
    try:
        clients = tuple(int(c) for c in args.clients.split(",") if c.strip())
        cfg = ServeBenchConfig(
            registry=args.registry,
            data=args.data,
            base_model=args.base_model,
            cache_dir=args.cache_dir,
            clients=clients,
            requests_per_client=args.requests_per_client,
            min_requests=args.min_requests,
            max_tokens=args.max_tokens,
            prompt_tokens=args.prompt_tokens,
            repeats=args.repeats,
            threads=args.threads,
            routing_pass=args.routing_pass,
            out=args.out,
        )
    except (ConfigError, ValueError) as exc:
        p.error(str(exc))
    doc = run(cfg)
    print("\n" + table(doc))
    verdict = {True: "MEETS", False: "MISSES"}
    print(
        f"\nwall clock: {verdict[doc['meets_target']]} the target (auto >= {TARGET}x fixed "
        f"throughput at {TARGET_LEVELS} clients, 0 lost); per server CPU-second: "
        f"{verdict[doc['meets_target_cpu']]} it; load average {doc['machine']['load_average']}; "
        f"{cfg.out / 'bench_serve.json'}, {cfg.out / 'bench_serve.png'}"
    )
    return 0
