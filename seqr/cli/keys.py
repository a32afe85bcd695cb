"""``seqr keys generate``: create an ECDSA P-256 signing key pair (seqr.core.signing).

``signing_key.pem`` (PKCS8, mode 0600) signs; ``signing_key.pub`` (PEM SubjectPublicKeyInfo) is
what the operator enrols and what ``model_signing verify key --public_key`` takes. The printed
fingerprint (``sha256:`` + 64 hex) is the key's name everywhere in seqr.

The passphrase never appears on the command line (it would show in ``ps`` and shell
history): it comes from an environment variable or from a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from seqr.cli.help import DefaultsHelpFormatter
from seqr.core.errors import KeyFileError, SeqrError
from seqr.core.key_files import write_keypair
from seqr.core.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME

MAX_PASSPHRASE_FILE_BYTES = 4096  # bytes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqr keys generate",
        description=(
            f"Create an ECDSA P-256 key pair: {PRIVATE_KEY_NAME} (PKCS8, mode 0600) and "
            f"{PUBLIC_KEY_NAME} (PEM; give it to the operator, and to `model_signing verify key "
            "--public_key`) in the folder --out, and print the key's full fingerprint. Refuses "
            "to overwrite an existing key."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="KEYDIR",
        help="folder for the key pair (created if missing)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="encrypt the private key with the passphrase in environment variable VAR",
    )
    source.add_argument(
        "--passphrase-file",
        metavar="FILE",
        type=Path,
        help="encrypt the private key with the passphrase in FILE (one trailing newline dropped)",
    )
    return parser


def read_passphrase(env_var: str | None, file: Path | None) -> bytes | None:
    """The passphrase from an environment variable or a file, or None for neither.

    Shared with other commands that load keys, so every command reads passphrases alike.
    """
    if env_var is not None:
        value = os.environ.get(env_var)
        if value is None:
            raise KeyFileError(f"environment variable {env_var} is not set; export the passphrase")
        if not value:
            raise KeyFileError(f"environment variable {env_var} is empty; set a passphrase")
        return value.encode("utf-8")
    if file is not None:
        try:
            with open(file, "rb") as handle:
                data = handle.read(MAX_PASSPHRASE_FILE_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"cannot read passphrase file {file}: {exc.strerror}") from None
        if len(data) > MAX_PASSPHRASE_FILE_BYTES:
            raise KeyFileError(
                f"passphrase file {file} is over {MAX_PASSPHRASE_FILE_BYTES} bytes; "
                "is it the right file?"
            )
        data = data.removesuffix(b"\n").removesuffix(b"\r")
        if not data:
            raise KeyFileError(f"passphrase file {file} is empty; write a passphrase into it")
        return data
    return None


def main(argv: list[str]) -> int:
    """Entry point of ``seqr keys generate``; prints the fingerprint, returns an exit code."""
    args = _parser().parse_args(argv)
    try:
        passphrase = read_passphrase(args.passphrase_env, args.passphrase_file)
        fp = write_keypair(args.out, passphrase)
    except SeqrError as exc:
        print(f"seqr keys generate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"seqr keys generate: error: cannot write to {args.out}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    print(fp)
    return 0
