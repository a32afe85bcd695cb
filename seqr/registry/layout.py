"""Where things live in a registry: a TUF repository (TUF spec 1.0, section 4) served as files.

::

    metadata/1.root.json ... N.root.json   root role versions (server keys, k-of-n)
    metadata/timestamp.json                newest snapshot's version and hash (short expiry)
    metadata/<v>.snapshot.json             versions of the targets metadata; its
                                           "x-seqr-log" field is the RFC 9162 signed tree head
    metadata/<v>.targets.json              every target file: hash, length, seqr "custom" fields
    targets/seqr/<sha256>.registry.json    federation pin, tensor layout, client allow-list,
                                           revocations (target path "seqr/registry.json")
    targets/adapters/<id>/<sha256>.<file>  one adapter's export files (target path
                                           "adapters/<id>/<file>"; <id> = SHA-256 of its weights)
    staging/                               the publisher's durable queue (not served)

Consistent snapshots (spec 6.2): metadata names carry versions and target names carry their
SHA-256, so a reader never mixes two repository states while the publisher writes the next;
timestamp.json is the only file ever replaced, and it is replaced last (the commit point).
A plain ``tuf.ngclient.Updater`` pointed at ``<base>/metadata/`` and ``<base>/targets/`` with
``1.root.json`` reads it as it is.
"""

from __future__ import annotations

import re

__all__ = [
    "METADATA",
    "TARGETS",
    "STAGING",
    "REGISTRY_TARGET",
    "LOG_FIELD",
    "SEQR_CUSTOM",
    "ADAPTER_ID",
    "root_name",
    "versioned_name",
    "adapter_target",
    "parse_adapter_target",
    "stored_target_name",
]

METADATA = "metadata"
TARGETS = "targets"
STAGING = "staging"
REGISTRY_TARGET = "seqr/registry.json"
LOG_FIELD = "x-seqr-log"  # snapshot field holding the signed tree head (an extension field)
SEQR_CUSTOM = "seqr"  # key of seqr's fields inside a target's "custom" object
ADAPTER_ID = re.compile(r"[0-9a-f]{64}")
_ADAPTER_TARGET = re.compile(r"adapters/([0-9a-f]{64})/([A-Za-z0-9][A-Za-z0-9._-]{0,127})")


def root_name(version: int) -> str:
    return f"{version}.root.json"


def versioned_name(role: str, version: int) -> str:
    """``<version>.<role>.json`` (consistent snapshots); timestamp.json is never versioned."""
    return "timestamp.json" if role == "timestamp" else f"{version}.{role}.json"


def adapter_target(adapter_id: str, file_name: str) -> str:
    return f"adapters/{adapter_id}/{file_name}"


def parse_adapter_target(path: str) -> tuple[str, str] | None:
    """(adapter id, file name) of an adapter target path; None for any other path."""
    match = _ADAPTER_TARGET.fullmatch(path)
    return None if match is None else (match.group(1), match.group(2))


def stored_target_name(path: str, sha256: str) -> str:
    """Path under targets/ of a target file: the hash prefixes its base name (spec 5.7.3)."""
    folder, _, base = path.rpartition("/")
    return f"{folder}/{sha256}.{base}" if folder else f"{sha256}.{base}"
