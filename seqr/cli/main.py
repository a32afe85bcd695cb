"""The ``seqr`` command: a thin dispatcher over subcommands that live beside their code.

Each entry maps a command path to ``module:function``; the function takes the remaining
argv and returns an exit code. Modules are imported only when their command runs, so
``seqr --help`` starts instantly and seqr.core never imports Flower.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # "command words": ("module:function", "one-line help")
    "bench hijack": ("seqr.sim.bench_hijack:main", "routing hijack by lying norm statistics"),
    "bench routing": (
        "seqr.sim.bench_routing:main",
        "time SEQR against SpectR/ARROW/brute force",
    ),
    "bench training": ("seqr.sim.bench_training:main", "time LoRA-FA training vs plain peft"),
    "client train": ("seqr.cli.client:main", "train, calibrate, export and sign a private adapter"),
    "data prepare": ("seqr.sim.data_prepare:main", "install and build the text domains corpus"),
    "simulate": ("seqr.sim.simulate:main", "run the whole federation here, then the report"),
    "simulate scale": ("seqr.sim.scale:main", "100+ clients on a tiny model: time and memory"),
    "simulate groups": ("seqr.sim.groups_eval:main", "a task group federates one adapter"),
    "keys generate": ("seqr.cli.keys:main", "create an Ed25519 adapter-signing key pair"),
    "server enrol": ("seqr.cli.server:enrol_main", "allow-list client keys and publish"),
    "server init": ("seqr.cli.server:init_main", "create a registry signed by server keys"),
    "server revoke": ("seqr.cli.server:revoke_main", "revoke client keys for good, publish"),
    "bench audit": ("seqr.sim.bench_audit:main", "time registry audit on 1,000 adapters"),
    "registry audit": ("seqr.cli.registry:main", "verify a downloaded adapter registry"),
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


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    rows = "\n".join(f"  seqr {name.ljust(width)}  {hint}" for name, (_, hint) in COMMANDS.items())
    return f"usage: seqr COMMAND [ARGS...]\n\ncommands:\n{rows}\n\nseqr COMMAND --help for each."


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Longest command path first so "registry audit" wins over a plain "registry".
    for name in sorted(COMMANDS, key=lambda n: -len(n.split())):
        words = name.split()
        if args[: len(words)] == words:
            target, _ = COMMANDS[name]
            module_name, func_name = target.split(":")
            func = getattr(importlib.import_module(module_name), func_name)
            return int(func(args[len(words) :]) or 0)
    print(_usage(), file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
    return 0 if not args or args[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
