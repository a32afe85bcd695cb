"""Federations, benchmarks and reports built on seqr_core, client and server."""
