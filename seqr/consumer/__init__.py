"""Whoever routes: audit the registry, route every input with SEQR, generate with the choice."""
