"""``seqr route``: route text (and optionally generate) with every adapter of an audited registry.

Exit status 0 on success; 1 when the registry fails its audit (the reason is printed and the
trusted state is left as it was) or the model / input cannot be used; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seqr.cli.help import (
    CACHE_DIR_HELP,
    CONSUMER_BASE_MODEL_HELP,
    EXPECT_ROOT_HELP,
    DefaultsHelpFormatter,
    add_old_spelling,
)
from seqr.core.printable import printable

if TYPE_CHECKING:
    from seqr.consumer.router import RegistryRouter, RouteResult

__all__ = ["main"]

MAX_INPUT_FILE_BYTES = 64 * 1024 * 1024  # bytes; --file is read whole


def _parser() -> argparse.ArgumentParser:
    from seqr.consumer.config import ROUTING_PASSES

    p = argparse.ArgumentParser(
        prog="seqr route",
        description="Audit an adapter registry, load its adapters onto the base model, and route "
        "each input with SEQR z-scores: prints the chosen adapter and its z-score margin over "
        "the runner-up; with --generate N also the greedy continuation (batched, mixed adapters).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--registry",
        required=True,
        metavar="DIR_OR_URL",
        help="registry folder (a mirror too) or its http(s) URL",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one input text")
    src.add_argument("--file", type=Path, help="UTF-8 file: one input per non-empty line")
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="new tokens per input (0: route only)"
    )
    p.add_argument(
        "--per-token",
        action="store_true",
        help="route every token in every LoRA module (default: one adapter per input)",
    )
    p.add_argument(
        "--trusted-state",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder remembering what this client trusted (rollback, fork) (default: the "
        "mirror's own state for a folder made by `seqr registry pull`, else none)",
    )
    p.add_argument(
        "--expect-root-sha256",
        default=None,
        metavar="HEX",
        help=EXPECT_ROOT_HELP,
    )
    p.add_argument("--base-model", default=None, help=CONSUMER_BASE_MODEL_HELP)
    p.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--routing-pass", choices=ROUTING_PASSES, default="float32",
                   help="dtype of the routing pass: float32 on the model itself (exact); "
                   "bfloat16 on a bf16 copy (faster generation, near-ties may flip); auto: "
                   "bfloat16 where the CPU has native bf16")  # fmt: skip
    add_old_spelling(p, "--first-pass-dtype", "routing_pass")
    p.add_argument(
        "--calibration",
        choices=("own", "reference", "blend", "queries"),
        default="own",
        help="own: z-score with each adapter's own signed statistics; reference: with "
        "statistics measured here on --reference text; blend: the mean of both z-scores; queries: "
        "sequence-level statistics over --reference holding unlabeled examples of your inputs",
    )
    p.add_argument("--reference", type=Path, default=None,
                   help="folder of public text files you trust (for --calibration "
                   "reference|blend), or examples of your inputs (queries)")  # fmt: skip
    p.add_argument("--aggregation", choices=("mean", "soft-vote"), default=None,
                   help="the mean of token z-scores, or soft token votes standardised over the "
                   "--calibration queries examples (docs/ROUTING.md); default: soft-vote with "
                   "--calibration queries per sequence, mean otherwise")  # fmt: skip
    p.add_argument("--loss-check-margin", type=float, default=None,
                   help="with soft votes: an input whose two best adapters score closer than "
                   "this goes to the one with the lower loss on the input (two "
                   "more forward passes of it; docs/ROUTING.md); 0: no check")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def _snake(choice: str | None) -> Any:
    return None if choice is None else choice.replace("-", "_")


def _inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    if args.text is not None:
        return [args.text]
    path: Path = args.file
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_INPUT_FILE_BYTES + 1)
    except OSError as exc:
        parser.error(f"cannot read --file {path}: {exc.strerror}")
    if len(data) > MAX_INPUT_FILE_BYTES:
        parser.error(f"--file {path} is over {MAX_INPUT_FILE_BYTES} bytes")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        parser.error(f"--file {path} is not UTF-8 ({exc})")
    texts = [line for line in lines if line.strip()]
    if not texts:
        parser.error(f"--file {path} holds no non-empty line")
    return texts


def _print_results(router: RegistryRouter, results: list[RouteResult], generate: bool) -> None:
    r = router.report
    trust = "first use" if r.first_use else f"consistent with trusted v{r.trusted_version_before}"
    # Names, reasons and texts come from clients and the registry: printed escaped.
    print(f"registry {printable(r.source)}: version {r.version}, {len(r.entries)} adapter(s) "
          f"audited ({trust})")  # fmt: skip
    names = ", ".join(printable(n) for n in router.names)
    print(f"adapters: {names}; routing {router.config.mode}")
    for name, reason in router.skipped.items():
        print(f"skipped {printable(name)}: {printable(reason)}")
    for i, res in enumerate(results, 1):
        if res.runner_up is None:
            margin = "only adapter"
        else:
            margin = f"margin {res.margin:+.3f} z over {printable(res.runner_up)}"
            if res.loss_check is not None:
                margin += f"; loss check: {res.loss_check}"
        snippet = res.text if len(res.text) <= 60 else res.text[:57] + "..."
        print(f"[{i}] {printable(res.adapter)}  ({margin})  {snippet!r}")
        if res.token_share is not None:
            shares = ", ".join(f"{printable(k)} {v:.0%}" for k, v in res.token_share.items())
            print(f"    per-token wins: {shares}")
        if generate:
            print(f"    -> {res.generated!r}")


def _fail(args: argparse.Namespace, exc: Exception, refused: bool) -> int:
    if args.json:
        doc = {"ok": False, "refused": refused, "error_type": type(exc).__name__, "error": str(exc)}
        print(json.dumps(doc))
    else:
        what = "REFUSED: the registry failed its audit" if refused else "ROUTING FAILED"
        print(f"{what}: {printable(exc)}", file=sys.stderr)
        if refused and args.trusted_state is not None:
            print(f"trusted state {args.trusted_state} left unchanged", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.generate < 0:
        parser.error(f"--generate {args.generate} must be >= 0")
    texts = _inputs(args, parser)
    from seqr.consumer.config import routing_pass_dtype
    from seqr.consumer.router import RegistryRouter, RouterConfig
    from seqr.core.errors import ConfigError, SeqrError
    from seqr.registry import AuditConfig, audit_registry, trusted_state_for

    try:
        config = RouterConfig(mode="per_token" if args.per_token else "per_sequence",
                              batch_size=args.batch_size, device=args.device,
                              first_pass_dtype=routing_pass_dtype(args.routing_pass,
                                                                  args.device),
                              calibration=args.calibration, reference=args.reference,
                              aggregation=_snake(args.aggregation),
                              **({} if args.loss_check_margin is None else
                                 {"loss_check_margin": args.loss_check_margin}))  # fmt: skip
        audit = AuditConfig(expected_root_sha256=args.expect_root_sha256)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        verified = audit_registry(
            args.registry, trusted_state_for(args.registry, args.trusted_state), config=audit
        )
    except SeqrError as exc:
        return _fail(args, exc, refused=True)
    report = verified.report
    try:
        router = RegistryRouter.from_verified(
            verified, base_model=args.base_model, cache_dir=args.cache_dir, config=config
        )
        if args.generate:
            results = router.route_and_generate(texts, args.generate)
        else:
            results = router.route(texts)
    except SeqrError as exc:
        return _fail(args, exc, refused=False)
    if args.json:
        doc = {
            "ok": True,
            "registry": {
                "source": report.source,
                "version": report.version,
                "first_use": report.first_use,
            },  # fmt: skip
            "mode": config.mode,
            "adapters": list(router.names),
            "skipped": dict(router.skipped),
            "results": [r.to_json() for r in results],
        }
        print(json.dumps(doc, indent=2))
    else:
        _print_results(router, results, bool(args.generate))
    return 0
