"""Tables from run records: one row per run, rebuilt from the ``run.json`` files alone.

A sweep writes ``table.csv`` into its sweep directory when its jobs are done
(``bench.run.sweeper``); ``python -m bench.report <sweep_dir>`` rebuilds it at any time,
e.g. after an interrupted sweep or when the jobs ran elsewhere (SLURM), together with
the paper table of an experiment sweep (``bench.report.paper``).

Columns: the settings that identify a run, then every measurement the records hold
(whatever the quality config produced), then ``status`` (``ok`` / ``failed``),
``error`` and ``job``. Nothing here knows which metrics exist.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.options import Schedule
from bench.report.records import RECORD_NAME
from metrics.files import atomic_write_bytes

TABLE_NAME = "table.csv"

# what identifies a row (settings), in this order; measurements follow
SETTING_COLUMNS = [
    "model", "prompts", "weights", "sampler", "steps", "model_calls", "schedule", "interval", "branch",
    "center", "power", "seed", "num_samples",
]
TAIL_COLUMNS = ["status", "error", "job"]


def _settings_row(rec: dict[str, Any], cache: dict[str, Any], arm: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings columns of one row; ``arm`` (a baseline) may run at other steps than the run."""
    s, arm = rec["settings"], arm or {}
    return {
        "model": s["model"]["name"],
        "prompts": (s["run"].get("prompts") or {}).get("name"),
        "weights": s["model"]["weights"],
        "sampler": s["sampler"]["name"],
        "steps": arm.get("steps", s["sampler"]["steps"]),
        "model_calls": arm.get("num_model_calls", rec.get("num_model_calls")),
        "schedule": cache["schedule"],
        "interval": cache["interval"],
        "branch": cache["branch"],
        "center": cache.get("center"),
        "power": cache.get("power"),
        "seed": s["run"]["seed"],
        "num_samples": rec.get("num_samples", s["run"]["num_samples"]),
    }


def _scalars(measurements: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in measurements.items() if isinstance(v, (int, float, str, bool)) or v is None}


def rows_from_record(rec: dict[str, Any], job: str) -> list[dict[str, Any]]:
    """The table rows of one run: its uncached baseline (if it has one), then the run itself."""
    tail = {"status": rec.get("status", "ok"), "error": rec.get("error"), "job": job}
    if tail["status"] != "ok":
        return [{**_settings_row(rec, rec["settings"]["cache"]), **tail}]
    rows = [{**_settings_row(rec, rec["cache"]), **_scalars(rec.get("measurements", {})), **tail}]
    base = rec.get("baseline")
    if base:
        rows.insert(0, {**_settings_row(rec, base["cache"], base), **_scalars(base.get("measurements", {})), **tail})
    return rows


def load_records(sweep_dir: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(job, record)`` for every ``<sweep_dir>/<job>/run.json``, in job order."""
    sweep_dir = Path(sweep_dir)
    paths = sorted(sweep_dir.glob(f"*/{RECORD_NAME}"), key=lambda p: _job_key(p.parent.name))
    if not paths:
        raise FileNotFoundError(f"no {RECORD_NAME} under {sweep_dir}/*/")
    return [(p.parent.name, json.loads(p.read_text())) for p in paths]


def build_table(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job (and one per distinct baseline), sorted by job number."""
    rows = [row for job, rec in load_records(sweep_dir) for row in rows_from_record(rec, job)]
    df = pd.DataFrame(rows)
    # a baseline shared by several cached runs appears once
    key = [c for c in SETTING_COLUMNS if c in df.columns]
    is_base = df["schedule"].eq(Schedule.none.value) & df["status"].eq("ok")
    df = pd.concat([df[is_base].drop_duplicates(subset=key), df[~is_base]]).sort_index()
    df = df.dropna(axis=1, how="all")
    # measurements in the order a cached run's record lists them (a baseline has fewer)
    measured: list[str] = []
    for r in sorted(rows, key=lambda r: r["schedule"] == Schedule.none):
        measured += [c for c in r if c in df.columns and c not in measured + SETTING_COLUMNS + TAIL_COLUMNS]
    order = [c for c in SETTING_COLUMNS if c in df.columns] + measured + [c for c in TAIL_COLUMNS if c in df.columns]
    return df[order].reset_index(drop=True)


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table atomically; floats to 6 significant digits (no float noise)."""
    return atomic_write_bytes(path, df.to_csv(index=False, float_format="%.6g").encode())


# ------------------------------------------------------------------------------------ for people


def fmt(x: Any, digits: int = 4) -> str:
    """A number for people: ``digits`` significant digits, no exponent for ordinary sizes."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.{digits}g}"


def format_row(row: dict[str, Any]) -> str:
    """One run in one line: what ran, speed-up ± spread, MACs, quality."""
    if row.get("schedule") == Schedule.none:
        what = "no cache"
    else:
        what = f"{row['schedule']} N={fmt(row['interval'])} branch {fmt(row['branch'])}"
        if row.get("schedule") == Schedule.nonuniform:
            what += f" c={fmt(row.get('center'))} p={fmt(row.get('power'))}"
    if row.get("steps") is not None:
        what = f"{row['steps']} steps, {what}"
    parts = [what]
    if row.get("speedup") is not None:
        s = f"speed-up {row['speedup']:.2f}x"
        if row.get("speedup_pm") is not None:
            s += f" ±{100 * row['speedup_pm']:.1f}%"
        if row.get("timing_reliable") is False:
            s += " (UNRELIABLE)"
        parts.append(s)
    if row.get("macs_g") is not None:
        parts.append(f"MACs {fmt(row['macs_g'])} G/call")
    for key in ("fid", "sfid", "is_mean", "precision", "recall", "clip_score"):
        if row.get(key) is not None:
            parts.append(f"{key} {fmt(row[key])}")
    return " | ".join(parts)


def print_summary(df: pd.DataFrame, file=sys.stdout) -> None:
    """The sweep's rows, one line each, failed rows with their error."""
    for _, r in df.iterrows():
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        line = format_row(row) if row.get("status") == "ok" else (
            f"FAILED {row.get('schedule')} N={fmt(row.get('interval'))}: {row.get('error')}")
        print(f"  [{row.get('job')}] {line}", file=file)
