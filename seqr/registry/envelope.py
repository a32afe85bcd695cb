"""DSSE's pre-authentication encoding for group contribution records (contributions.py).

Registry metadata is TUF's own (python-tuf); what is still ours are the records group members
sign. Each signature covers PAE(type, payload), DSSE v1 (github.com/secure-systems-lab/dsse,
protocol.md), so a record can never be replayed as any other signed document.
"""

from __future__ import annotations

from securesystemslib.dsse import Envelope

__all__ = ["pae"]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: the exact bytes each signature covers."""
    return Envelope(payload, payload_type, {}).pae()
