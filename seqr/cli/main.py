"""The ``seqr`` command: a thin dispatcher over subcommands that live beside their code.

Each entry maps a command path to ``module:function``; the function takes the remaining
argv and returns an exit code. Modules are imported only when their command runs, so
``seqr --help`` starts instantly and seqr.core never imports Flower.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # "command words": ("module:function", "one-line help")
    "bench hijack": ("seqr.sim.bench_hijack:main", "routing hijack by lying norm statistics"),
    "bench plausibility": (
        "seqr.sim.bench_plausibility:main",
        "honest adapters refused and liars admitted by the plausibility check",
    ),
    "bench routing": (
        "seqr.sim.bench_routing:main",
        "time SEQR against SpectR/ARROW/brute force",
    ),
    "bench training": ("seqr.sim.bench_training:main", "time LoRA-FA training vs plain peft"),
    "bench device": ("seqr.sim.bench_device:main", "routing on a GPU chooses what the CPU does"),
    "client train": ("seqr.cli.client:main", "train, calibrate, export and sign a private adapter"),
    "data prepare": ("seqr.sim.data_prepare:main", "install and build the text domains corpus"),
    "simulate": ("seqr.sim.simulate:main", "run the whole federation here, then the report"),
    "simulate scale": ("seqr.sim.scale:main", "100+ clients on a tiny model: time and memory"),
    "simulate groups": ("seqr.sim.groups_eval:main", "a task group federates one adapter"),
    "keys generate": ("seqr.cli.keys:main", "create an ECDSA P-256 signing key pair"),
    "server enrol": ("seqr.cli.server:enrol_main", "allow-list client keys and publish"),
    "server init": ("seqr.cli.server:init_main", "create a registry signed by server keys"),
    "server revoke": ("seqr.cli.server:revoke_main", "revoke client keys for good, publish"),
    "bench audit": ("seqr.sim.bench_audit:main", "time registry audit on 1,000 adapters"),
    "registry audit": ("seqr.cli.registry:audit_main", "verify a registry (folder or URL)"),
    "registry pull": ("seqr.cli.registry:pull_main", "fetch a registry into a verified mirror"),
    "registry serve": ("seqr.cli.registry:serve_main", "serve a registry folder over HTTP"),
    "server refresh": ("seqr.cli.server:refresh_main", "re-sign what is close to expiry"),
    "route": ("seqr.cli.route:main", "audit a registry, route (and generate) with its adapters"),
    "serve": ("seqr.cli.serve:main", "OpenAI-compatible server that routes every request"),
    "bench serve": ("seqr.consumer.serve.bench:main", "seqr serve: auto vs named adapter"),
    "bench generation": ("seqr.sim.bench_generation:main", "routed vs fixed-adapter generate"),
    "deploy certs": (
        "seqr.deploy.certs:main",
        "test CA + SuperLink TLS certificate (localhost SANs)",
    ),
    "deploy node-key": (
        "seqr.deploy.node_keys:main",
        "SuperNode auth key pair (ECDSA P-384, OpenSSH)",
    ),
}


HELP = ("-h", "--help")


def _usage(group: str | None = None) -> str:
    names = [n for n in COMMANDS if group is None or n.split()[0] == group]
    width = max(len(name) for name in names)
    rows = "\n".join(f"  seqr {n.ljust(width)}  {COMMANDS[n][1]}" for n in sorted(names))
    head = f"seqr {group} COMMAND" if group else "seqr COMMAND"
    return f"usage: {head} [ARGS...]\n\ncommands:\n{rows}\n\nseqr COMMAND --help for each."


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit status 0 success, 1 failure, 2 usage (as argparse does)."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader left early (`seqr ... --help | head`): stop quietly, as cat does. Python's
        # docs (signal module, "Note on SIGPIPE"): point stdout at devnull so the interpreter's
        # final flush cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _dispatch(args: list[str]) -> int:
    if args[:1] == ["--version"]:
        from seqr import __version__

        print(f"seqr {__version__}")
        return 0
    # Longest command path first so "simulate scale" wins over a plain "simulate".
    for name in sorted(COMMANDS, key=lambda n: -len(n.split())):
        words = name.split()
        if args[: len(words)] == words:
            target, _ = COMMANDS[name]
            module_name, func_name = target.split(":")
            func = getattr(importlib.import_module(module_name), func_name)
            return int(func(args[len(words) :]) or 0)
    groups = {n.split()[0] for n in COMMANDS}
    if not args or args[0] in HELP:
        print(_usage())
        return 0
    if args[0] in groups and (len(args) == 1 or args[1] in HELP):
        asked = len(args) > 1  # `seqr registry --help`: that group's commands
        print(_usage(args[0]), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    wanted = " ".join(a for a in args[:2] if not a.startswith("-"))
    print(f"seqr: unknown command {wanted!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
