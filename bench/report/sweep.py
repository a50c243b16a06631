"""A sweep's tables, written in one place: ``table.csv`` and the paper table it describes.

Used by the sweepers when their jobs are done (:func:`bench.run.sweeper.finish`) and by
``python -m bench.report <sweep_dir>`` (:mod:`bench.report.__main__`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.report.paper import render
from bench.report.table import TABLE_NAME, build_table, write_csv


@dataclass
class SweepTables:
    table: pd.DataFrame  # one row per job and per distinct baseline
    path: Path  # the written table.csv
    paper: list[Path] = field(default_factory=list)  # the paper table's files, if the sweep describes one


def write_tables(sweep_dir: str | Path) -> SweepTables:
    """Build ``table.csv`` from the records under ``sweep_dir`` and render the paper table.
    Raises ``FileNotFoundError`` when the sweep has no record."""
    sweep_dir = Path(sweep_dir)
    df = build_table(sweep_dir)
    path = write_csv(df, sweep_dir / TABLE_NAME)
    return SweepTables(df, path, render(sweep_dir))
