"""``seqr client train``: train, calibrate, export and sign an adapter in one command.

The same ``seqr.node.task.run_client`` runs inside the Flower ClientApp. An interrupted run
resumes from its last checkpoint when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from seqr.cli.help import CACHE_DIR_HELP, DefaultsHelpFormatter
from seqr.cli.keys import read_passphrase
from seqr.core.errors import ConfigError, SeqrError
from seqr.core.federation import FederationConfig
from seqr.core.key_files import key_file_in

PROG = "seqr client train"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a LoRA-FA adapter on a private text folder (only B is trained; A is "
        "the federation's shared frozen A), calibrate its norm statistics, and write a signed "
        "export folder ready to submit. Nothing but that folder leaves this machine.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="folder of private text files")
    p.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="KEY",
        help="the client's private key: KEYDIR/signing_key.pem or the folder KEYDIR that holds "
        "it (`seqr keys generate --out KEYDIR`)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="export folder to create (must not exist)"
    )
    p.add_argument("--federation", type=Path, help="federation TOML (default: built-in settings)")
    p.add_argument("--steps", type=int, help="override train-steps (and ignore train-tokens)")
    p.add_argument("--name", help="adapter label (default: the data folder's name)")
    p.add_argument("--cache-dir", type=Path, help=CACHE_DIR_HELP)
    p.add_argument(
        "--checkpoint-dir", type=Path, help="checkpoints (default: hidden, beside --out)"
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=50, metavar="N", help="checkpoint every N steps"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="the key's passphrase is in environment variable VAR",
    )
    source.add_argument(
        "--passphrase-file",
        metavar="FILE",
        type=Path,
        help="the key's passphrase is in FILE (one trailing newline dropped)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    return p


def main(argv: list[str]) -> int:
    """Entry point; prints a JSON summary of the export on success, returns an exit code."""
    args = _parser().parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        fed = FederationConfig.from_toml(args.federation) if args.federation else FederationConfig()
        if args.steps is not None:
            fed = fed.replace(train_steps=args.steps, train_tokens=0)
        if args.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
        passphrase = read_passphrase(args.passphrase_env, args.passphrase_file)
        from seqr.node.task import run_client  # torch and transformers load here, after the checks

        run = run_client(
            args.data,
            key_file_in(args.key),
            args.out,
            fed,
            name=args.name,
            passphrase=passphrase,
            cache_dir=args.cache_dir,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            progress=not args.quiet,
        )
    except SeqrError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    summary = {
        "export": str(run.out_dir),
        "name": run.manifest.name,
        "key_fingerprint": run.manifest.fingerprint,
        "base_model_sha256": run.manifest.base_model_sha256,
        "a_sha256": run.manifest.a_sha256,
        "steps": run.train.steps,
        "resumed_from": run.train.resumed_from,
        "train_tokens": run.train.tokens,
        "train_tokens_per_second": round(run.train.tokens_per_second, 1),
        "final_train_loss": run.train.losses[-1] if run.train.losses else None,
        "heldout_loss": None if run.heldout_loss != run.heldout_loss else run.heldout_loss,
        "calibration_tokens_per_module": run.calibration.tokens,
        "calibration_lora_active": run.calibration.lora_active,
        "privacy": run.calibration.privacy,
        "adapter_bytes": run.adapter_bytes,
    }
    print(json.dumps(summary, indent=2))
    return 0
