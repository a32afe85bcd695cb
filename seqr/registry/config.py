"""Settings of the registry publisher and auditor; each validates itself on construction.

Security bounds carry their units (python-tuf UpdaterConfig style): every file an auditor
reads has a byte cap, so a malicious mirror cannot feed it endless data (TUF attack list).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

from seqr.core.errors import ConfigError
from seqr.core.model_signature import MAX_BUNDLE_BYTES
from seqr.registry.metadata import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    MANIFEST_SIG_FILE,
    FederationPin,
    TensorSpec,
)

__all__ = ["AuditConfig", "PublisherConfig"]

_MiB = 1024 * 1024


@dataclass(frozen=True)
class AuditConfig:
    """Limits and trust anchors for ``audit_registry``."""

    max_pointer_bytes: int = 1024  # latest.json
    max_root_bytes: int = 1 * _MiB  # one root/<v>.root.json
    max_metadata_bytes: int = 256 * _MiB  # one metadata/<v>.registry.json (~1 KB per adapter)
    max_tree_head_bytes: int = 64 * 1024  # log/<v>.tree_head.json
    max_adapter_bytes: int = 1024 * _MiB  # adapter_model.safetensors
    max_small_file_bytes: int = 16 * _MiB  # adapter_config.json, norm_stats.json
    max_manifest_bytes: int = 64 * 1024  # manifest.json (seqr.core.manifest's own cap)
    max_versions: int = 1_000_000  # registry versions (= log leaves)
    max_roots: int = 10_000  # root rotations
    workers: int = 2  # threads checking adapter folders (hashlib and numpy release the GIL)
    # First use without a trusted state: pin root/1.root.json by its SHA-256 (hex), obtained
    # out of band from the server operator. None = trust on first use (reported as such).
    expected_root_sha256: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "expected_root_sha256":
                if value is not None and not (
                    isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)
                ):
                    raise ConfigError(
                        f"AuditConfig.expected_root_sha256 = {value!r} must be 64 lowercase hex "
                        "digits (sha256sum of root/1.root.json) or None"
                    )
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"AuditConfig.{f.name} = {value!r} must be a positive integer")

    def file_cap(self, name: str) -> int:
        """Byte cap for one stored export file."""
        if name == ADAPTER_FILE:
            return self.max_adapter_bytes
        if name == MANIFEST_FILE:
            return self.max_manifest_bytes
        if name == MANIFEST_SIG_FILE:
            return MAX_BUNDLE_BYTES  # the client's model-signing bundle
        return self.max_small_file_bytes


@dataclass(frozen=True)
class PublisherConfig:
    """How the server publishes registry versions."""

    expires_after: timedelta = timedelta(days=7)  # registry metadata lifetime (freeze bound)
    root_expires_after: timedelta = timedelta(days=365)
    # Signed into every version; each adapter must match (None: not checked).
    tensor_spec: Mapping[str, TensorSpec] | None = None
    federation: FederationPin | None = None
    # True: a valid signed export from a new client key enrols that key (trust on first
    # submission, e.g. when Flower's node authentication already gates who can submit).
    # False: keys must be enrolled with Publisher.enrol_client first.
    auto_enrol: bool = False

    def __post_init__(self) -> None:
        for name in ("expires_after", "root_expires_after"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigError(f"PublisherConfig.{name} = {value!r} must be > timedelta(0)")
        if self.root_expires_after < self.expires_after:
            raise ConfigError(
                f"PublisherConfig.root_expires_after ({self.root_expires_after}) must not be "
                f"shorter than expires_after ({self.expires_after})"
            )
        spec = self.tensor_spec
        if spec is not None and not (
            spec and all(isinstance(v, TensorSpec) for v in spec.values())
        ):
            raise ConfigError("PublisherConfig.tensor_spec must map tensor names to TensorSpec")
        if self.federation is not None and not isinstance(self.federation, FederationPin):
            raise ConfigError(
                f"PublisherConfig.federation must be a FederationPin, got {type(self.federation)}"
            )
        if not isinstance(self.auto_enrol, bool):
            raise ConfigError(f"PublisherConfig.auto_enrol = {self.auto_enrol!r} must be a bool")
