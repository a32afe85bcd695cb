"""Simulations, evaluation, benchmarks and reports: the whole federation on one machine."""
