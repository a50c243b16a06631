"""Tables from run records: one row per run, rebuilt from the ``run.json`` files alone.

A multirun writes ``table.csv`` into its sweep directory at the end (the Hydra
callback below only calls :func:`write_table`); after an interrupted sweep the table
can be rebuilt with ``python -m bench.report <sweep_dir>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback

from bench.records import RECORD_NAME

TABLE_NAME = "table.csv"

# settings columns first (what was swept), then measurements
SETTING_COLUMNS = [
    "model", "weights", "sampler", "steps", "model_calls", "schedule", "interval", "branch",
    "center", "power", "seed", "num_samples",
]
MEASURE_COLUMNS = [
    "macs_paper", "macs_all", "macs_full_paper", "macs_retrieval_paper", "macs_predicted_speedup",
    "throughput", "throughput_baseline", "speedup", "timing_method", "timing_batch_size",
    "protocol", "fid", "sfid", "is_mean", "is_std", "precision", "recall", "clip_score",
    "generation_time_s", "wall_time_s",
]


def _settings_row(rec: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    s = rec["settings"]
    return {
        "model": s["model"]["name"],
        "weights": s["model"]["weights"],
        "sampler": s["sampler"]["name"],
        "steps": s["sampler"]["steps"],
        "model_calls": rec.get("num_model_calls"),
        "schedule": cache["schedule"],
        "interval": cache["interval"],
        "branch": cache["branch"],
        "center": cache.get("center"),
        "power": cache.get("power"),
        "seed": s["run"]["seed"],
        "num_samples": rec.get("num_samples"),
    }


def rows_from_record(rec: dict[str, Any], job: str) -> list[dict[str, Any]]:
    """The table rows of one run: the run itself, plus its uncached baseline if it has one."""
    row = {**_settings_row(rec, rec["cache"]), **{k: rec.get(k) for k in MEASURE_COLUMNS}, "job": job}
    rows = [row]
    base = rec.get("baseline")
    if base:
        b = {**_settings_row(rec, base["cache"]), **{k: base.get(k) for k in MEASURE_COLUMNS}, "job": job}
        rows.insert(0, b)
    return rows


def build_table(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job (and one per distinct baseline), sorted by job number."""
    sweep_dir = Path(sweep_dir)
    paths = sorted(sweep_dir.glob(f"*/{RECORD_NAME}"), key=lambda p: _job_key(p.parent.name))
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(rows_from_record(json.loads(path.read_text()), path.parent.name))
    if not rows:
        raise FileNotFoundError(f"no {RECORD_NAME} under {sweep_dir}/*/")
    df = pd.DataFrame(rows)
    # a baseline shared by several cached runs appears once
    key = [c for c in SETTING_COLUMNS if c in df.columns]
    is_base = df["schedule"].eq("none")
    df = pd.concat([df[is_base].drop_duplicates(subset=key), df[~is_base]]).sort_index()
    df = df.dropna(axis=1, how="all")
    order = [c for c in SETTING_COLUMNS + MEASURE_COLUMNS + ["job"] if c in df.columns]
    return df[order].reset_index(drop=True)


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def write_table(sweep_dir: str | Path) -> Path:
    """Build and write ``table.csv`` atomically into ``sweep_dir``."""
    df = build_table(sweep_dir)
    out = Path(sweep_dir) / TABLE_NAME
    tmp = out.with_name(f".{TABLE_NAME}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(out)
    return out


class TableCallback(Callback):
    """Hydra callback: at the end of a multirun, write the sweep's ``table.csv``."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(f"table: {write_table(sweep_dir)}")
        except FileNotFoundError as e:
            print(f"table: not written ({e})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.report <sweep_dir>", file=sys.stderr)
        return 2
    try:
        print(write_table(argv[0]))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
