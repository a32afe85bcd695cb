"""Where the server gets an audited registry: the one step run at start and on every reload.

``--registry`` is a registry folder, a pulled mirror of one, or a URL. A URL is pulled into a
local mirror first (seqr.registry.pull_registry: only missing target files are downloaded, and
nothing is written before it verifies); ``RegistrySource.audited`` is the single place that
knows where the bytes came from.

Rollback and fork protection across reloads come from the trusted state (seqr.registry): with
``--trusted-state DIR`` (or a mirror's own state) it survives restarts; without one the server
keeps a private one for its own lifetime, so a reload can never go back to an older version or
a forked log.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from seqr.registry import AuditConfig, VerifiedRegistry, audit_registry, pull_registry
from seqr.registry.audit import trusted_state_for


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


@dataclass
class RegistrySource:
    """``audited()``: the registry at ``location``, audited against the trusted state."""

    location: str
    trusted_state: Path | None = None  # None: the mirror's own, else private to this process
    audit_config: AuditConfig = field(default_factory=AuditConfig)
    mirror: Path | None = None  # where a URL is pulled (None: a private folder)

    def __post_init__(self) -> None:
        self._private = tempfile.TemporaryDirectory(prefix="seqr-serve-")
        private = Path(self._private.name)
        if is_url(self.location):
            self.mirror = self.mirror or private / "mirror"
        else:
            given = trusted_state_for(self.location, self.trusted_state)
            self.trusted_state = Path(given) if given is not None else private / "trusted"

    @property
    def path(self) -> str:
        """What the log and the page name as the registry."""
        return self.location

    def audited(self) -> VerifiedRegistry:
        """Pull (for a URL) and audit the registry now: raises a SeqrError naming what failed;
        the trusted state is updated only on success."""
        if self.mirror is not None:
            return pull_registry(self.location, self.mirror, config=self.audit_config)
        return audit_registry(
            Path(self.location).expanduser(), self.trusted_state, config=self.audit_config
        )
