"""``seqr server init / enrol / revoke / refresh``: the operator's registry commands.

init creates a registry signed by the server key(s) (optionally pinned to a federation);
enrol and revoke change the client allow-list and publish a new version at once, so the
running ServerApp (which admits the keys of the newest published version) sees the change;
refresh re-signs what is close to expiry (run it from cron between rounds). Every command
checks its keys against the registry's root before it changes anything, so a refused command
leaves nothing behind. Passphrases never appear on the command line
(seqr.cli.keys.read_passphrase), and no message repeats the contents of a key file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from seqr.cli.help import DefaultsHelpFormatter
from seqr.cli.keys import read_passphrase
from seqr.core.admission_policy import WEIGHT_DTYPES
from seqr.core.errors import ConfigError, KeyFileError, SeqrError
from seqr.core.key_files import load_public_key
from seqr.core.signing import FINGERPRINT_PREFIX, fingerprint, parse_public_key
from seqr.operator.registry_ops import init_registry, load_server_keys, open_publisher

__all__ = ["init_main", "enrol_main", "revoke_main", "refresh_main"]


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument(
        "--registry", required=True, type=Path, metavar="DIR", help="the registry folder"
    )
    parser.add_argument(
        "--key",
        required=True,
        action="append",
        type=Path,
        metavar="KEY",
        help="a server private key: KEYDIR/signing_key.pem or its folder KEYDIR (repeat for "
        "k-of-n; create with `seqr keys generate --out KEYDIR`)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="the server keys' passphrase is in environment variable VAR",
    )
    source.add_argument(
        "--passphrase-file",
        metavar="FILE",
        type=Path,
        help="the server keys' passphrase is in FILE (one trailing newline dropped)",
    )
    return parser


def _keys(args: argparse.Namespace) -> list:  # type: ignore[type-arg]
    return load_server_keys(args.key, read_passphrase(args.passphrase_env, args.passphrase_file))


def _run(prog: str, body: Callable[[], None]) -> int:
    try:
        body()
    except ConfigError as exc:  # a setting or argument to correct: a usage error
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except SeqrError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return 0


def init_main(argv: list[str]) -> int:
    """``seqr server init``: create a registry; prints the root hash clients should pin."""
    parser = _parser(
        "seqr server init",
        "Create a new adapter registry (root 1 + an empty signed version 1) in --registry.",
    )
    parser.add_argument("--threshold", type=int, default=1, help="signatures needed (k of n)")
    parser.add_argument(
        "--federation",
        type=Path,
        help="federation TOML: pin its base model, shared A and tensor layout into the registry "
        "(loads the base model to hash it)",
    )
    parser.add_argument(
        "--adapter-dtype",
        default="F32",
        choices=WEIGHT_DTYPES,
        help="dtype of every adapter tensor",
    )
    args = parser.parse_args(argv)
    if args.adapter_dtype != "F32" and args.federation is None:
        parser.error("--adapter-dtype is pinned only with --federation; add --federation FILE")

    def body() -> None:
        keys = _keys(args)
        setup = None
        if args.federation is not None:
            setup = _load_setup(args.federation, args.adapter_dtype)
        root = init_registry(args.registry, keys, threshold=args.threshold, setup=setup)
        print(f"registry: {args.registry} (version 1, {len(keys)} key(s), threshold "
              f"{args.threshold})")  # fmt: skip
        print(f"root sha256: {root}  (clients pin it: --expect-root-sha256 {root})")
        if setup is not None:
            print(f"federation pinned: base model {setup.federation.base_model_sha256}, "
                  f"shared A {setup.federation.a_sha256}")  # fmt: skip

    return _run("seqr server init", body)


def enrol_main(argv: list[str]) -> int:
    """``seqr server enrol``: allow-list client keys and publish."""
    parser = _parser("seqr server enrol", "Allow-list client signing keys, then publish.")
    parser.add_argument(
        "--client",
        required=True,
        action="append",
        metavar="PUB",
        help="client public key: its signing_key.pub file, or the hex of its DER (repeatable)",
    )
    args = parser.parse_args(argv)

    def body() -> None:
        publics = [_public_key(c) for c in args.client]  # every key checked before any change
        with open_publisher(args.registry, _keys(args), None) as publisher:
            enrolled = set(publisher.document.clients)
            ids = [publisher.enrol_client(p) for p in publics]
            new = [i for i in ids if i not in enrolled]
            if not publisher.pending:
                print(f"already enrolled: {', '.join(ids)}; nothing published")
                return
            version = publisher.publish()
        print(f"enrolled {', '.join(new)}; published version {version.version}")

    return _run("seqr server enrol", body)


def revoke_main(argv: list[str]) -> int:
    """``seqr server revoke``: revoke a client key for good (its adapters leave) and publish."""
    parser = _parser("seqr server revoke", "Revoke client keys for good, then publish.")
    parser.add_argument(
        "--client",
        required=True,
        action="append",
        metavar="KEY",
        help="fingerprint (sha256:...) or a signing_key.pub file (repeatable)",
    )
    parser.add_argument("--reason", required=True, help="why (recorded in the registry)")
    args = parser.parse_args(argv)

    def body() -> None:
        with open_publisher(args.registry, _keys(args), None) as publisher:
            ids = [_keyid(c) for c in args.client]
            for keyid in ids:
                publisher.revoke_client(keyid, args.reason)
            version = publisher.publish()
        print(f"revoked {', '.join(ids)}; published version {version.version}")

    return _run("seqr server revoke", body)


def refresh_main(argv: list[str]) -> int:
    """``seqr server refresh``: re-sign the timestamp (and whatever would expire first)."""
    parser = _parser(
        "seqr server refresh",
        "Re-sign the registry's timestamp, and its snapshot, targets or root when they would "
        "expire first, so clients keep accepting it between rounds (run it from cron).",
    )
    args = parser.parse_args(argv)

    def body() -> None:
        with open_publisher(args.registry, _keys(args), None) as publisher:
            version = publisher.publish()
        print(f"registry version {version.version} refreshed")

    return _run("seqr server refresh", body)


def _public_key(text: str) -> bytes:
    # A path or the key's hex; errors name the file or the mistake, never the text (a private
    # key given by mistake must not end up in a terminal or a log).
    try:
        if os.path.lexists(text):  # False (not an error) for a name too long to be a path
            return load_public_key(text)
        return parse_public_key(text, what="--client value")
    except KeyFileError as exc:  # a --client to correct: a usage error (exit 2)
        raise ConfigError(str(exc)) from None


def _keyid(text: str) -> str:
    return text if text.startswith(FINGERPRINT_PREFIX) else fingerprint(_public_key(text))


def _load_setup(path: Path, adapter_dtype: str):  # type: ignore[no-untyped-def]
    from seqr.core.base_model import load_base_model
    from seqr.core.federation import FederationConfig
    from seqr.operator.federation_setup import setup_federation

    fed = FederationConfig.from_toml(path)
    try:
        base = load_base_model(fed.base_model, expected_sha256=fed.base_model_sha256)
    except SeqrError as exc:
        raise ConfigError(f"federation {path}: {exc}") from None
    return setup_federation(fed, base.model, base.sha256, adapter_dtype=adapter_dtype)
