"""Settings of the registry publisher and its clients; each validates itself on construction.

Security bounds carry their units (python-tuf UpdaterConfig style): every file a client reads
has a byte cap, so a malicious mirror cannot feed it endless data (TUF attack list), and no
signed expiry may lie further ahead than the client allows (a publisher whose clock ran
ahead would otherwise remove the freeze bound for as long as its expiry says).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import timedelta

from seqr.core.errors import ConfigError
from seqr.core.manifest import ADAPTER_WEIGHTS_NAME, MANIFEST_NAME
from seqr.registry.metadata import FederationPin, TensorSpec

__all__ = ["AuditConfig", "PublisherConfig", "MAX_FREEZE"]

_MiB = 1024 * 1024
# Longest a timestamp or snapshot may stay valid: what a client accepts and what a publisher
# may sign (a mirror can replay a stale registry for at most this long: indefinite freeze).
MAX_FREEZE = timedelta(days=31)


@dataclass(frozen=True)
class AuditConfig:
    """Limits and trust anchors of a registry client (``audit_registry``, ``pull``)."""

    max_root_bytes: int = 512 * 1024  # one N.root.json (tuf UpdaterConfig default)
    max_timestamp_bytes: int = 16 * 1024  # timestamp.json
    max_snapshot_bytes: int = 2 * _MiB  # N.snapshot.json
    max_targets_bytes: int = 64 * _MiB  # N.targets.json (~1 KB per adapter file)
    max_adapter_bytes: int = 1024 * _MiB  # adapter_model.safetensors
    max_manifest_bytes: int = 64 * 1024  # manifest.json
    max_small_file_bytes: int = 16 * _MiB  # every other export file
    max_versions: int = 1_000_000  # targets versions (= transparency log leaves)
    max_root_rotations: int = 256  # new roots accepted in one refresh (tuf's default)
    max_freeze: timedelta = MAX_FREEZE  # furthest a timestamp/snapshot expiry may lie ahead
    max_clock_skew: timedelta = timedelta(minutes=5)  # tree head times may be this far ahead
    workers: int = 2  # threads checking adapter files (hashlib and numpy release the GIL)
    # First use without a trusted state: pin metadata/1.root.json by its SHA-256 (hex), got
    # out of band from the operator. None = trust on first use (the report says so).
    expected_root_sha256: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "expected_root_sha256":
                if value is not None and not (
                    isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)
                ):
                    raise ConfigError(
                        f"expected root sha256 {value!r:.80} must be 64 lowercase hex digits "
                        "(sha256sum of metadata/1.root.json)"
                    )
            elif isinstance(value, timedelta):
                if value <= timedelta(0):
                    raise ConfigError(f"AuditConfig.{f.name} = {value} must be positive")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"AuditConfig.{f.name} = {value!r} must be a positive integer")

    def file_cap(self, name: str) -> int:
        """Byte cap for one export file."""
        if name == ADAPTER_WEIGHTS_NAME:
            return self.max_adapter_bytes
        if name == MANIFEST_NAME:
            return self.max_manifest_bytes
        return self.max_small_file_bytes


@dataclass(frozen=True)
class PublisherConfig:
    """How the server signs registry versions (TUF role lifetimes are the freeze bounds)."""

    timestamp_expires: timedelta = timedelta(days=7)  # re-signed every round (freeze bound)
    snapshot_expires: timedelta = timedelta(days=14)
    targets_expires: timedelta = timedelta(days=90)
    root_expires: timedelta = timedelta(days=365)
    # Signed into seqr/registry.json; each adapter must match (None: not checked).
    tensor_spec: Mapping[str, TensorSpec] | None = None
    federation: FederationPin | None = None
    # True: a valid signed export from a new client key enrols that key (trust on first
    # submission, e.g. when Flower's node authentication already gates who can submit).
    # False: keys must be enrolled with Publisher.enrol_client first.
    auto_enrol: bool = False

    def __post_init__(self) -> None:
        lifetimes = ("timestamp_expires", "snapshot_expires", "targets_expires", "root_expires")
        for name in lifetimes:
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigError(f"PublisherConfig.{name} = {value!r} must be > 0")
        for name in ("timestamp_expires", "snapshot_expires"):
            if getattr(self, name) > MAX_FREEZE:
                raise ConfigError(
                    f"PublisherConfig.{name} = {getattr(self, name)} is longer than the "
                    f"{MAX_FREEZE.days} days clients accept (the freeze bound)"
                )
        if not (self.timestamp_expires <= self.snapshot_expires <= self.root_expires):
            raise ConfigError("role lifetimes must grow: timestamp <= snapshot <= root")
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
