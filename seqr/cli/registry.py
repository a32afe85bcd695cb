"""``seqr registry audit``: verify a downloaded adapter registry offline before routing with it.

Exit status 0 when every signature, hash, threshold, version, expiry, log proof and adapter
file checks out (the trusted state file is then updated); 1 with the reason on any failure
(the trusted state is left untouched); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from seqr.core.errors import ConfigError, SeqrError
from seqr.registry.audit import AuditReport, audit_registry
from seqr.registry.codec import format_time
from seqr.registry.config import AuditConfig

__all__ = ["main"]


def _parse_now(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--now {text!r} is not an ISO-8601 time like 2025-06-01T12:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"--now {text!r} has no time zone; add Z (UTC) or an offset like +02:00"
        )
    return when


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqr registry audit",
        description="Verify a seqr adapter registry offline: server signatures and thresholds, "
        "root rotations, versions against the trusted state (rollback, fork), expiry (freeze), "
        "the RFC 9162 log, and every adapter's files and client signature.",
    )
    parser.add_argument("path", type=Path, help="registry folder (a copy or a mirror)")
    parser.add_argument(
        "--trusted-state",
        type=Path,
        default=None,
        help="file remembering the last version this client trusted; created on first use, "
        "updated only after a successful audit",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--now", type=_parse_now, default=None, help="check expiry at this time (default: now)"
    )
    parser.add_argument(
        "--expect-root-sha256",
        default=None,
        help="first use only: SHA-256 of root/1.root.json, obtained from the server operator "
        "(default: trust on first use)",
    )
    parser.add_argument("--workers", type=int, default=2, help="threads checking adapters")
    return parser


def _print_report(report: AuditReport) -> None:
    print(
        f"registry {report.path}: version {report.version}, root {report.root_version} "
        f"({report.threshold}-of-{len(report.server_keys)}, signed by "
        f"{', '.join(report.signed_by)}), expires {format_time(report.expires)}"
    )
    print(f"log: {report.tree_size} versions, RFC 9162 root {report.tree_root}")
    if report.first_use:
        print("trust: first use (no trusted state before this audit)")
    else:
        print(f"trust: consistent with trusted version {report.trusted_version_before}")
    for e in report.entries:
        print(
            f"  OK  {e.adapter_sha256[:16]}  {e.client}  {e.name:<24}  "
            f"admitted {format_time(e.admitted)}  {e.size_bytes / 1024:.1f} KiB"
        )
        if e.contributors:  # a group adapter: the server signed it, these clients produced it
            examples = e.examples_by_client or {}
            who = ", ".join(f"{k} ({examples.get(k, 0)} training chunks)" for k in e.contributors)
            print(f"      group of {len(e.contributors)}, {e.group_rounds} round(s): {who}")
    state = "trusted state updated" if report.trusted_state_updated else "no trusted state kept"
    print(
        f"AUDIT PASSED: {len(report.entries)} adapter(s), {report.clients} client key(s), "
        f"{report.revoked} revoked; {state} ({report.seconds:.2f} s)"
    )


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = AuditConfig(workers=args.workers, expected_root_sha256=args.expect_root_sha256)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        report = audit_registry(args.path, args.trusted_state, args.now, config=config)
    except SeqrError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error_type": type(exc).__name__, "error": str(exc)}))
        else:
            print(f"AUDIT FAILED ({type(exc).__name__}): {exc}", file=sys.stderr)
            if args.trusted_state is not None:
                print(f"trusted state {args.trusted_state} left unchanged", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
    return 0
