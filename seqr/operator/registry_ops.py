"""Server keys and the registry's Publisher, shared by the operator CLI and the ServerApp.

The registry signs with the server's keys (``seqr keys generate`` folders: signing_key.pem),
never with a client's. A registry made with a federation pins the base model, the shared A
and the tensor layout into every version it signs, so an auditor can check each adapter
against them (seqr.registry).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core.errors import KeyFileError
from seqr.core.key_files import key_file_in, load_private_key
from seqr.operator.federation_setup import FederationSetup
from seqr.operator.settings import state_dir_for
from seqr.registry import layout, store
from seqr.registry.config import PublisherConfig
from seqr.registry.publish import Publisher

__all__ = [
    "load_server_keys",
    "publisher_config",
    "init_registry",
    "open_publisher",
    "root_sha256",
]


def load_server_keys(
    paths: Sequence[Path], passphrase: bytes | None = None
) -> list[EllipticCurvePrivateKey]:
    """The private keys ``--key`` names, one per path: a key folder (``<folder>/signing_key.pem``)
    or the key file itself (key_file_in)."""
    if not paths:
        raise KeyFileError("no server key given; create one with `seqr keys generate`")
    return [load_private_key(key_file_in(path), passphrase) for path in paths]


def publisher_config(setup: FederationSetup | None, *, auto_enrol: bool = False) -> PublisherConfig:
    """Federation pin and tensor spec signed into every version (None: not pinned)."""
    return PublisherConfig(
        federation=None if setup is None else setup.pin,
        tensor_spec=None if setup is None else setup.tensor_spec,
        auto_enrol=auto_enrol,
    )


def init_registry(
    registry: Path,
    keys: Sequence[EllipticCurvePrivateKey],
    *,
    threshold: int = 1,
    setup: FederationSetup | None = None,
    now: datetime | None = None,
) -> str:
    """Create the registry (root 1 + signed empty version 1) and the server's state folder;
    return the SHA-256 of metadata/1.root.json, which clients pin (AuditConfig
    expected_root_sha256) instead of trusting the first root they download."""
    publisher = Publisher.create(
        Path(registry), keys, threshold=threshold, config=publisher_config(setup), now=now
    )
    publisher.close()
    store.ensure_dir(state_dir_for(Path(registry)))
    return root_sha256(registry)


def open_publisher(
    registry: Path,
    keys: Sequence[EllipticCurvePrivateKey],
    setup: FederationSetup | None,
    *,
    auto_enrol: bool = False,
) -> Publisher:
    """The single writer of an existing registry (restarts continue from its stored state)."""
    return Publisher(Path(registry), keys, publisher_config(setup, auto_enrol=auto_enrol))


def root_sha256(registry: Path) -> str:
    data = store.read_capped(
        Path(registry), f"{layout.METADATA}/{layout.root_name(1)}", 1 << 20, "root 1"
    )
    return hashlib.sha256(data).hexdigest()
