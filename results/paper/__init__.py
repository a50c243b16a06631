"""The paper's numbers as data (CSV, typed in by hand), installed as the package ``bench.paper``."""
