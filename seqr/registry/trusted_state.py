"""What a client remembers between audits: the last registry version and log head it trusted.

Like python-tuf's local metadata cache, but small: hashes pin the exact root and registry
files already verified (root files and versioned metadata are immutable), and the tree head
lets the next audit demand an RFC 9162 consistency proof (fork / split view). The file is
written atomically and ONLY after a fully successful audit (tough once cached a timestamp
that had failed its rollback check; SECURITY.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from seqr.core.atomic_write import write_atomic
from seqr.core.errors import FormatError
from seqr.registry.codec import Fields, dumps, format_time, loads

__all__ = ["TrustedState", "load_trusted_state", "save_trusted_state"]

MAX_STATE_BYTES = 64 * 1024  # bytes


@dataclass(frozen=True)
class TrustedState:
    registry_id: str  # SHA-256 of root/1.root.json: which registry this state belongs to
    root_version: int
    root_sha256: str  # SHA-256 of root/<root_version>.root.json
    registry_version: int
    registry_sha256: str  # SHA-256 of metadata/<registry_version>.registry.json
    tree_size: int
    tree_root: str  # hex RFC 9162 root hash of the log at tree_size
    audited: datetime

    def to_bytes(self) -> bytes:
        return (
            dumps(
                {
                    "_type": "trusted_state",
                    "registry_id": self.registry_id,
                    "root_version": self.root_version,
                    "root_sha256": self.root_sha256,
                    "registry_version": self.registry_version,
                    "registry_sha256": self.registry_sha256,
                    "tree_size": self.tree_size,
                    "tree_root": self.tree_root,
                    "audited": format_time(self.audited),
                }
            )
            + b"\n"
        )

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "trusted state") -> TrustedState:
        if len(data) > MAX_STATE_BYTES:
            raise FormatError(f"{what} is {len(data)} bytes, over {MAX_STATE_BYTES}")
        f = Fields(
            loads(data, what),
            what,
            (
                "_type",
                "registry_id",
                "root_version",
                "root_sha256",
                "registry_version",
                "registry_sha256",
                "tree_size",
                "tree_root",
                "audited",
            ),
        )
        f.const("_type", "trusted_state")
        state = cls(
            registry_id=f.hex("registry_id", 32),
            root_version=f.integer("root_version", low=1),
            root_sha256=f.hex("root_sha256", 32),
            registry_version=f.integer("registry_version", low=1),
            registry_sha256=f.hex("registry_sha256", 32),
            tree_size=f.integer("tree_size", low=1),
            tree_root=f.hex("tree_root", 32),
            audited=f.time("audited"),
        )
        if state.tree_size != state.registry_version:
            raise FormatError(
                f"{what}: tree_size {state.tree_size} must equal registry_version "
                f"{state.registry_version} (one log leaf per version)"
            )
        return state


def load_trusted_state(path: Path) -> TrustedState | None:
    """The state at ``path``, or None when the file does not exist yet (first use)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    return TrustedState.from_bytes(data, str(path))


def save_trusted_state(path: Path, state: TrustedState) -> None:
    """Atomically replace the state file (temp + fsync + rename + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, state.to_bytes())
