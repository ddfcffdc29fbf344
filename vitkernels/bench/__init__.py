"""Benchmarks as a user tool: ``python -m vitkernels.bench --help``."""
