"""A sweep's tables, written in one place: ``table.csv`` and the paper table it describes.

Used by the sweepers when their jobs are done (:func:`bench.run.sweeper.finish`) and by
``python -m bench.report <sweep_dir>`` (:mod:`bench.report.__main__`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.report.paper import render
from bench.report.table import TABLE_NAME, build_table, missing_jobs, missing_message, write_csv


@dataclass
class SweepTables:
    table: pd.DataFrame  # one row per job and per distinct baseline
    path: Path  # the written table.csv
    paper: list[Path] = field(default_factory=list)  # the paper table's files, if the sweep describes one
    missing: list[str] = field(default_factory=list)  # jobs the sweep launched that left no run.json

    def missing_line(self) -> str:
        """One line naming the missing jobs (empty when none is)."""
        if not self.missing:
            return ""
        return missing_message(self.missing, self.table["job"].nunique())


def write_tables(sweep_dir: str | Path) -> SweepTables:
    """Build ``table.csv`` from the records under ``sweep_dir`` (a job that left none is a
    ``missing`` row) and render the paper table. Raises ``FileNotFoundError`` when the sweep
    has neither a record nor a known job."""
    sweep_dir = Path(sweep_dir)
    df = build_table(sweep_dir)
    path = write_csv(df, sweep_dir / TABLE_NAME)
    return SweepTables(df, path, render(sweep_dir), missing_jobs(df))
