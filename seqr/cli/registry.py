"""``seqr registry audit | pull | serve``: what a client (or a reviewer) does with a registry.

audit: refresh a trusted state from a registry folder or URL and verify everything (TUF's
checks, the transparency log, every adapter); exit 0 when it passed, 1 with the reason when
not (the trusted state is then left untouched), 2 for bad arguments.
pull: the same from a URL, keeping a verified mirror in a folder that every consumer can use.
serve: serve a registry folder read-only over HTTP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seqr.cli.help import EXPECT_ROOT_HELP, DefaultsHelpFormatter
from seqr.core.errors import ConfigError, SeqrError
from seqr.core.printable import printable
from seqr.registry.audit import AuditReport, audit_registry, pull_registry
from seqr.registry.codec import format_time
from seqr.registry.config import AuditConfig

__all__ = ["audit_main", "pull_main", "serve_main"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expect-root-sha256",
        default=None,
        metavar="HEX",
        help=EXPECT_ROOT_HELP,
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--workers", type=int, default=2, help="threads checking adapters")


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AuditConfig:
    try:
        return AuditConfig(workers=args.workers, expected_root_sha256=args.expect_root_sha256)
    except ConfigError as exc:
        parser.error(str(exc))


def _print_report(report: AuditReport) -> None:
    print(
        f"registry {printable(report.source)}: version {report.version}, root "
        f"{report.root_version} ({report.threshold}-of-{len(report.server_keys)}), "
        f"refresh before {format_time(report.expires)}"
    )
    print(f"root 1 sha256: {report.root_sha256}")
    print(f"log: {report.tree_size} versions, RFC 9162 root {report.tree_root}")
    if report.first_use:
        print("trust: first use (no trusted state before this audit)")
    else:
        print(f"trust: extends the trusted version {report.trusted_version_before}")
    for e in report.entries:
        print(
            f"  OK  {e.adapter_sha256[:16]}  {printable(e.name):<24}  {e.client}  "
            f"admitted {format_time(e.admitted)}  {e.size_bytes / 1024:.1f} KiB"
        )
        if e.contributors:  # a group adapter: the server signed it, these clients produced it
            examples = e.examples_by_client or {}
            for k in e.contributors:
                print(f"      contributor {k} ({examples.get(k, 0)} training chunks)")
    state = "trusted state updated" if report.trusted_state_updated else "no trusted state kept"
    fetched = f"; downloaded {report.downloaded_files} file(s)" if report.downloaded_files else ""
    print(
        f"AUDIT PASSED: {len(report.entries)} adapter(s), {report.clients} client key(s), "
        f"{report.revoked} revoked; {state}{fetched} ({report.seconds:.2f} s)"
    )


def _run(args: argparse.Namespace, verify, state: str | None) -> int:  # type: ignore[no-untyped-def]
    try:
        verified = verify()
    except SeqrError as exc:
        message = printable(str(exc)).replace("\\n", "\n")
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            print(f"AUDIT FAILED: {message}", file=sys.stderr)
            if state is not None:
                print(f"trusted state {state} left unchanged", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(verified.report.to_json(), indent=2))
    else:
        _print_report(verified.report)
    return 0


def audit_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr registry audit",
        formatter_class=DefaultsHelpFormatter,
        description="Verify a seqr adapter registry: TUF metadata (signatures, thresholds, "
        "root rotations, rollback, freeze, mix-and-match), the RFC 9162 log against the "
        "trusted state (fork), and every adapter's files, signature and statistics.",
    )
    parser.add_argument("source", help="registry folder (or a mirror) or its http(s) URL")
    parser.add_argument(
        "--trusted-state",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder remembering what this client trusted; created on first use, updated "
        "only after a successful audit (default: remember nothing)",
    )
    _common(parser)
    args = parser.parse_args(argv)
    config = _config(parser, args)
    state = None if args.trusted_state is None else str(args.trusted_state)
    return _run(args, lambda: audit_registry(args.source, args.trusted_state, config=config), state)


def pull_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr registry pull",
        formatter_class=DefaultsHelpFormatter,
        description="Fetch a registry over HTTP(S) into DIR with python-tuf's client: only "
        "files DIR lacks are downloaded, nothing is written before it verifies, and DIR "
        "becomes a verified mirror (its trusted state in DIR/.seqr) that `seqr route "
        "--registry DIR` and `seqr serve --registry DIR` use.",
    )
    parser.add_argument("url", help="registry base URL (holding metadata/ and targets/)")
    parser.add_argument("dir", type=Path, help="local mirror folder (created if missing)")
    _common(parser)
    args = parser.parse_args(argv)
    config = _config(parser, args)
    state = str(args.dir / ".seqr")
    return _run(args, lambda: pull_registry(args.url, args.dir, config=config), state)


def serve_main(argv: list[str]) -> int:
    from seqr.registry.serve import RegistryServer

    parser = argparse.ArgumentParser(
        prog="seqr registry serve",
        formatter_class=DefaultsHelpFormatter,
        description="Serve a registry folder read-only over HTTP (metadata/ and targets/ only).",
    )
    parser.add_argument("dir", type=Path, help="registry folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no request log")
    args = parser.parse_args(argv)
    if not (args.dir / "metadata" / "1.root.json").is_file():
        parser.error(f"{args.dir} holds no registry (metadata/1.root.json is missing)")
    try:
        server = RegistryServer(args.dir, args.host, args.port, quiet=args.quiet)
    except OSError as exc:
        print(f"seqr registry serve: cannot listen on {args.host}:{args.port}: {exc.strerror}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"serving {args.dir} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
