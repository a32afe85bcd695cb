"""Where the server gets an audited registry: the one step run at start and on every reload.

Today ``--registry`` is a folder (a registry or a mirror of one). Registry URLs arrive with the
pull client: ``RegistrySource.audited`` is the single place that will pull into a local mirror
first and then audit it; nothing else in the server knows where the bytes came from.

Rollback and fork protection across reloads come from the trusted state (seqr.registry): with
``--trusted-state FILE`` it survives restarts; without one the server keeps a private one for
its own lifetime, so a reload can never go back to an older version or a forked log.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from seqr.core.errors import ConfigError
from seqr.registry import AuditConfig, AuditReport, audit_registry


@dataclass(frozen=True)
class AuditedRegistry:
    """A registry folder that passed ``audit_registry`` just now, and the report."""

    path: Path
    report: AuditReport


@dataclass
class RegistrySource:
    """``audited()``: the registry at ``location``, audited against the trusted state."""

    location: str
    trusted_state: Path | None = None  # None: a private state for this process's lifetime
    audit_config: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        scheme = urlsplit(self.location).scheme
        if scheme and len(scheme) > 1:  # "C:" style drive letters are not URLs
            raise ConfigError(
                f"--registry {self.location!r} is a URL; this server reads a registry folder "
                "(a local mirror) until the registry pull client exists"
            )
        if self.trusted_state is None:
            self._private = tempfile.TemporaryDirectory(prefix="seqr-serve-trust-")
            self.trusted_state = Path(self._private.name) / "trusted.json"

    @property
    def path(self) -> Path:
        return Path(self.location).expanduser()

    def audited(self) -> AuditedRegistry:
        """Audit the registry now (raises a SeqrError naming what failed; the trusted state is
        updated only on success)."""
        report = audit_registry(self.path, self.trusted_state, config=self.audit_config)
        return AuditedRegistry(self.path, report)
