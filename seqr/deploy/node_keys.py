"""``seqr deploy node-key``: a SuperNode authentication key pair (ECDSA P-384, OpenSSH format).

Flower's SuperNode authentication (``flower-superlink --enable-supernode-auth``, TLS only)
admits a SuperNode whose public key the operator registered (``flwr supernode register
node.pub CONNECTION``); the SuperNode proves it holds the private key
(``flower-supernode --auth-supernode-private-key node``). Flower reads the private key with
``load_ssh_private_key`` and the public key with ``load_ssh_public_key`` and wants a NIST curve.

This key authenticates the node's transport only. It is NOT the adapter-signing key
(``seqr keys generate``, ECDSA P-256): that one signs what the node publishes and is checked by
everyone later (docs/THREATS.md, "Flower's own security"). Keep the two apart.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from seqr.cli.help import DefaultsHelpFormatter
from seqr.core.errors import ConfigError, SeqrError
from seqr.deploy.files import PRIVATE_MODE, PUBLIC_MODE, write_new_files

__all__ = ["make_node_key", "node_key_bytes", "ssh_fingerprint", "main"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def node_key_bytes(comment: str = "seqr-supernode") -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a new P-384 key."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # flower-supernode loads it without a passphrase
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b" " + comment.encode("ascii") + b"\n"


def ssh_fingerprint(public_line: bytes) -> str:
    """``SHA256:<base64>`` of the key blob, as ``ssh-keygen -l`` prints it (out-of-band check)."""
    blob = base64.b64decode(public_line.split()[1], validate=True)
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_node_key(out_dir: Path, name: str = "node") -> tuple[Path, Path]:
    """Write ``<name>`` (0600) and ``<name>.pub`` into ``out_dir``; refuse existing files."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"node key name {name!r} must be 1-64 characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    private, public = node_key_bytes(comment=name)
    write_new_files(
        Path(out_dir), {name: (private, PRIVATE_MODE), f"{name}.pub": (public, PUBLIC_MODE)}
    )
    return Path(out_dir) / name, Path(out_dir) / f"{name}.pub"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seqr deploy node-key",
        description="Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH format): "
        "NAME (private, 0600) for flower-supernode --auth-supernode-private-key and NAME.pub "
        "for the operator's `flwr supernode register NAME.pub CONNECTION`.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the key pair")
    parser.add_argument("--name", default="node", help="file name of the private key")
    args = parser.parse_args(argv)
    try:
        private, public = make_node_key(args.out, args.name)
    except SeqrError as exc:
        print(f"seqr deploy node-key: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"seqr deploy node-key: error: cannot write to {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {private} (private, 0600) and {public}")
    print(f"fingerprint (as ssh-keygen -l shows it): {ssh_fingerprint(public.read_bytes())}")
    print(f"register it on the SuperLink: flwr supernode register {public} <CONNECTION>")
    return 0
