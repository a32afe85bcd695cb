"""The signed, versioned, append-only adapter registry and its RFC 9162 transparency log."""
