"""The adapter registry: a TUF repository (python-tuf) with an RFC 9162 transparency log.

Server side (the Flower ServerApp and `seqr server` call these; no Flower here)::

    pub = Publisher.create(path, [server_key], config=PublisherConfig(...))  # once
    pub = Publisher(path, [server_key], config)                              # afterwards
    pub.enrol_client(client_public_key)        # allow-list (or PublisherConfig.auto_enrol)
    pub.stage_adapter(files)                   # an admitted export: name -> bytes
    pub.publish()                              # sign and commit the next version

Client side, before routing (a folder or an http(s) URL)::

    verified = audit_registry(source, trusted_state_folder)   # raises on any failure
    verified = pull_registry(url, mirror_folder)              # the same, keeping a mirror

layout.py describes the files; client.py the checks a client runs; entries.py seqr's checks
of each adapter.
"""

from seqr.registry.audit import (
    AuditReport,
    VerifiedAdapter,
    VerifiedRegistry,
    audit_registry,
    pull_registry,
    trusted_state_for,
)
from seqr.registry.config import AuditConfig, PublisherConfig
from seqr.registry.entries import EntryReport
from seqr.registry.metadata import FederationPin, RegistryDocument, TensorSpec
from seqr.registry.publish import PublishedVersion, Publisher

__all__ = [
    "AuditConfig",
    "AuditReport",
    "EntryReport",
    "FederationPin",
    "PublishedVersion",
    "Publisher",
    "PublisherConfig",
    "RegistryDocument",
    "TensorSpec",
    "VerifiedAdapter",
    "VerifiedRegistry",
    "audit_registry",
    "pull_registry",
    "trusted_state_for",
]
