"""``seqr serve``: an OpenAI-compatible server that routes every request with SEQR.

Exit status 0 after a clean stop (Ctrl+C / SIGTERM); 1 when the registry fails its audit at start
or the base model cannot be used (nothing is served then); 2 for bad arguments. ``kill -HUP``
re-reads and audits the registry; only a version that passes replaces the served one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from seqr.cli.help import (
        CACHE_DIR_HELP,
        CONSUMER_BASE_MODEL_HELP,
        EXPECT_ROOT_HELP,
        DefaultsHelpFormatter,
        add_old_spelling,
    )
    from seqr.consumer.config import ROUTING_PASSES
    from seqr.consumer.serve.config import EngineConfig, LimitsConfig, PoolConfig, ServeConfig

    serve, limits, engine, pool = ServeConfig(), LimitsConfig(), EngineConfig(), PoolConfig()
    p = argparse.ArgumentParser(
        prog="seqr serve",
        description="Serve an audited adapter registry over the OpenAI API: model 'auto' routes "
        "each request to an adapter with SEQR; a named adapter or 'base' runs as asked. "
        "GET / shows the registry and a prompt box; /metrics is Prometheus; SIGHUP reloads.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--registry",
        required=True,
        metavar="DIR_OR_URL",
        help="registry folder, a mirror of one, or its URL (pulled into --mirror first)",
    )
    p.add_argument(
        "--mirror",
        type=Path,
        default=None,
        metavar="DIR",
        help="for a URL: the folder to pull into, keeping the trusted state across restarts "
        "(default: a private folder for this process)",
    )
    p.add_argument("--host", default=serve.host, help="address to listen on")
    p.add_argument("--port", type=int, default=serve.port, help="port (0: any free port)")
    p.add_argument(
        "--base-model",
        default=None,
        help=CONSUMER_BASE_MODEL_HELP,
    )
    p.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    p.add_argument(
        "--trusted-state",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder remembering the last trusted registry version across restarts "
        "(default: a pulled mirror's own, else remembered for this process only)",
    )
    p.add_argument(
        "--expect-root-sha256",
        default=None,
        metavar="HEX",
        help=EXPECT_ROOT_HELP,
    )
    p.add_argument(
        "--refresh-s",
        type=float,
        default=serve.refresh_s,
        help="re-read and audit the registry every this many seconds (default: only on SIGHUP)",
    )
    p.add_argument(
        "--calibration",
        choices=("queries", "own"),
        default=serve.calibration,
        help="queries: z-score with statistics measured on the prompts this "
        "server routed, starting from the adapters' own until enough were seen; own: "
        "the adapters' signed statistics only",
    )
    p.add_argument(
        "--pool-warm",
        type=int,
        default=pool.warm_sequences,
        help="routed prompts before query statistics are used (and as many voting prompts "
        "again before soft token votes decide)",
    )
    p.add_argument(
        "--aggregation",
        choices=("soft-vote", "mean"),
        default=pool.aggregation.replace("_", "-"),
        help="under query statistics: soft token votes standardised over the pool, or the "
        "mean of token z-scores (docs/ROUTING.md)",
    )
    p.add_argument(
        "--loss-check-margin",
        type=float,
        default=pool.loss_check_margin,
        help="under soft votes, a prompt whose two best adapters score closer than this goes "
        "to the one with the lower loss on the prompt (two more forward passes); 0: no check",
    )
    p.add_argument(
        "--max-batch", type=int, default=engine.max_batch, help="sequences decoded together"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=engine.queue_size,
        help="sequences that may wait (HTTP 429 beyond)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=limits.max_prompt_tokens,
        help="longest prompt, in tokens, a request may send",
    )
    p.add_argument("--max-n", type=int, default=limits.max_n, help="choices per prompt")
    p.add_argument(
        "--max-prompts",
        type=int,
        default=limits.max_prompts,
        help="prompts in one completions request",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=limits.max_tokens,
        help="largest max_tokens a request may ask for",
    )
    p.add_argument("--device", default=engine.device, help="torch device, e.g. cuda")
    p.add_argument(
        "--routing-pass",
        choices=ROUTING_PASSES,
        default="auto",
        help="dtype of the routing pass over each prompt: float32 runs it on the base model "
        "itself (exact); bfloat16 on a bf16 copy (~2.5x faster on CPUs with AMX, near-ties "
        "may flip); auto: bfloat16 where the CPU has native bf16, float32 elsewhere",
    )
    add_old_spelling(p, "--first-pass-dtype", "routing_pass")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="least severe log messages shown",
    )
    return p


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from seqr.consumer.config import routing_pass_dtype
    from seqr.consumer.serve import RegistrySource, SeqrServer, ServeConfig, build_state
    from seqr.consumer.serve.config import EngineConfig, LimitsConfig, PoolConfig
    from seqr.core.errors import ConfigError, SeqrError
    from seqr.registry import AuditConfig

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        d, room = LimitsConfig(), max(1, args.max_tokens)  # defaults never above the limit
        limits = LimitsConfig(
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            max_n=args.max_n,
            max_prompts=args.max_prompts,
            default_max_tokens=min(d.default_max_tokens, room),
            default_chat_max_tokens=min(d.default_chat_max_tokens, room),
        )
        pool = PoolConfig(
            warm_sequences=args.pool_warm,
            aggregation=args.aggregation.replace("-", "_"),
            loss_check_margin=args.loss_check_margin,
        )
        config = ServeConfig(
            host=args.host,
            port=args.port,
            calibration=args.calibration,
            refresh_s=args.refresh_s,
            limits=limits,
            pool=pool,
            engine=EngineConfig(
                max_batch=args.max_batch,
                queue_size=args.queue_size,
                device=args.device,
                first_pass_dtype=routing_pass_dtype(args.routing_pass, args.device),
            ),
        )
        source = RegistrySource(
            args.registry,
            args.trusted_state,
            AuditConfig(expected_root_sha256=args.expect_root_sha256),
            args.mirror,
        )
        if args.threads < 0:
            raise ConfigError(f"--threads {args.threads} must be >= 0")
    except ConfigError as exc:
        parser.error(str(exc))
    import torch

    from seqr.core.base_model import load_base_model
    from seqr.core.federation import DEFAULT_BASE_MODEL

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base = load_base_model(args.base_model or DEFAULT_BASE_MODEL, cache_dir=args.cache_dir)
        state = build_state(config, source, base)
        server = SeqrServer(state)
    except (SeqrError, OSError) as exc:
        print(f"NOT SERVING: {exc}", file=sys.stderr)
        return 1
    version = state.live.current
    print(
        f"seqr serve: registry {source.path} version {version.version} audited, adapters "
        f"{', '.join(version.names)}; calibration {config.calibration}; routing pass "
        f"{config.engine.first_pass_dtype or 'float32'}",
        flush=True,
    )
    print(
        f"listening on {server.url} (OpenAI base_url {server.url}/v1; page {server.url}/)",
        flush=True,
    )
    server.run()
    return 0
