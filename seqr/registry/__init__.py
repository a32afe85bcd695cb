"""The signed, versioned, append-only adapter registry and its RFC 9162 transparency log.

Server side (the Flower ServerApp calls these; no Flower here)::

    pub = Publisher.create(path, [server_key], config=PublisherConfig(...))  # once
    pub = Publisher(path, [server_key], config)                              # on restart
    pub.enrol_client(client_public_key)        # allow-list (or PublisherConfig.auto_enrol)
    pub.stage_adapter(files)                   # an admitted export: name -> bytes
    pub.publish()                              # sign and commit the next version

Client side, before routing::

    report = audit_registry(path, trusted_state_path)   # raises on any failure

The on-disk layout is described in store.py; the checks in verify.py and entries.py.
"""

from seqr.registry.audit import AuditReport, audit_registry
from seqr.registry.config import AuditConfig, PublisherConfig
from seqr.registry.entries import EntryReport
from seqr.registry.metadata import FederationPin, TensorSpec
from seqr.registry.publish import PublishedVersion, Publisher
from seqr.registry.trusted_state import TrustedState

__all__ = [
    "AuditConfig",
    "AuditReport",
    "EntryReport",
    "FederationPin",
    "PublishedVersion",
    "Publisher",
    "PublisherConfig",
    "TensorSpec",
    "TrustedState",
    "audit_registry",
]
