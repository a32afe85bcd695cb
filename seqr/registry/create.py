"""A new registry on disk: root 1 and an empty, signed version 1 (Publisher.create opens it).

Every file is verified with the auditor's own checks before it is written, and latest.json,
written last, is the commit point: a crash before it leaves a folder Publisher refuses to open
(delete it and create again), never a half-trusted registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from seqr.core import signing
from seqr.core.errors import RegistryError
from seqr.registry import merkle, store
from seqr.registry.config import PublisherConfig
from seqr.registry.envelope import REGISTRY_TYPE, sign_envelope
from seqr.registry.metadata import RegistryMetadata, pointer_bytes
from seqr.registry.roots import make_root, sign_root, verify_root_chain
from seqr.registry.tree_head import sign_tree_head
from seqr.registry.verify import verify_version

__all__ = ["write_new_registry"]


def write_new_registry(
    path: Path,
    signing_keys: Sequence[EllipticCurvePrivateKey],
    *,
    root_keys: Sequence[bytes] | None,
    threshold: int,
    config: PublisherConfig,
    when: datetime,
) -> None:
    """Write root 1 (``root_keys``, default the signing keys' public keys, k-of-n
    ``threshold``) and an empty version 1 signed by ``signing_keys`` into an empty ``path``."""
    if path.exists() and any(path.iterdir()):
        raise RegistryError(f"{path} exists and is not empty; choose a new folder")
    publics = list(root_keys) if root_keys else [signing.public_key_bytes(k) for k in signing_keys]
    root = make_root(1, publics, threshold, when, when + config.root_expires_after)
    root_file = sign_root(root, signing_keys)
    verify_root_chain([root_file], trusted_version=None, trusted_sha256=None)
    first = RegistryMetadata(
        version=1,
        root_version=1,
        issued=when,
        expires=when + config.expires_after,
        previous=None,
        clients={},
        revoked={},
        tensor_spec=config.tensor_spec,
        federation=config.federation,
        entries=(),
    )
    data = sign_envelope(REGISTRY_TYPE, first.to_payload(), signing_keys)
    verify_version(1, data, None, None, [root])
    store.write_new_file(path / store.root_path(1), root_file)
    store.write_new_file(path / store.metadata_path(1), data)
    leaves = [merkle.leaf_hash(data)]
    store.write_new_file(
        path / store.tree_head_path(1), sign_tree_head(leaves, root, when, signing_keys)
    )
    store.write_file(path / store.POINTER, pointer_bytes(1))  # commit point
