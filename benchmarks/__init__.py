"""Benchmarks behind the README's performance numbers: ``python -m benchmarks.<name>`` from the repository root."""
