"""Reporting: run records, tables built from them, the paper's tables, the regression gate.
``python -m bench.report <sweep_dir>`` rebuilds a sweep's tables (:mod:`bench.report.__main__`)."""
