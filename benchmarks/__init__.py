"""Benchmarks behind the performance numbers of docs/timing.md and docs/metrics.md: ``python -m benchmarks.<name>`` from the repository root."""
