"""seqr server: admission checks and the signed adapter registry (ServerApp)."""
