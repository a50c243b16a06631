"""Tables from run records: one row per run, rebuilt from the ``run.json`` files alone.

A sweep writes ``table.csv`` into its sweep directory when its jobs are done
(``bench.run.sweeper``); ``python -m bench.report <sweep_dir>`` rebuilds it at any time,
e.g. after an interrupted sweep or when the jobs ran elsewhere (SLURM), together with
the paper table of an experiment sweep (``bench.report.paper``).

Columns: the settings that identify a run, then every measurement the records hold
(whatever the quality config produced), then ``status`` (``ok`` / ``failed`` /
``missing``), ``error`` and ``job``. Nothing here knows which metrics exist.

Every job the sweep launched is a row (:mod:`bench.report.jobs` says which there were):
a job that left no record -- killed at its time limit, lost with its node, never
started, or still running -- is a ``missing`` row with the settings that are known
of it, never a gap that makes an incomplete sweep look complete.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.options import Schedule
from bench.report.jobs import PlannedJob, columns_from_overrides, planned_jobs
from bench.report.records import RECORD_NAME
from metrics.files import atomic_write_bytes

TABLE_NAME = "table.csv"

# what identifies a row (settings), in this order; measurements follow
SETTING_COLUMNS = [
    "model", "prompts", "weights", "sampler", "steps", "model_calls", "schedule", "interval", "branch", "center",
    "power", "ablation", "method", "setting", "seed", "num_samples",
]
# a record's cache keys that are not a method's knob columns
_NOT_KNOBS = {"method", "label", "skip_producer", "skip_consumer", *SETTING_COLUMNS}
DEEPCACHE = "deepcache"  # a record whose cache section names no method (bench.caching.engine.CacheSettings)
NO_CACHE = "none"
TAIL_COLUMNS = ["status", "error", "job"]
MISSING = "missing"
MISSING_ERROR = ("no run.json: the job was killed, lost or never started (or is still running); rerun the sweep "
                 "command with the same hydra.sweep.dir to finish it (runs resume from the image store)")


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
        "schedule": cache.get("schedule"),
        "interval": cache.get("interval"),
        "branch": cache.get("branch"),
        "center": cache.get("center"),
        "power": cache.get("power"),
        # an ablation (main paper Table 5) only: tables of ordinary runs keep their columns
        "ablation": None if cache.get("ablation") in (None, "none") else cache["ablation"],
        # another method than DeepCache (bench.caching.method): its name, a label, its knobs
        "method": cache.get("method") or _method_of(cache),
        "setting": cache.get("label"),
        **{k: _cell(cache[k]) for k in knob_columns(cache)},
        "seed": s["run"]["seed"],
        "num_samples": rec.get("num_samples", s["run"]["num_samples"]),
    }


def _method_of(cache: dict[str, Any]) -> str | None:
    """The method of a failed run's settings (``cache._target_``); None for DeepCache."""
    target = cache.get("_target_")
    if not target or target == "bench.caching.engine.CacheSettings":
        return None
    try:
        from hydra.utils import get_class

        return get_class(target).name
    except Exception:  # a bad _target_ is the error the row reports
        return str(target).rsplit(".", 1)[-1]


def knob_columns(cache: dict[str, Any]) -> list[str]:
    """A method's knob columns in a record's cache section (not DeepCache's, which are settings columns)."""
    return [k for k in cache if k not in _NOT_KNOBS and not k.startswith("_")]


def _cell(v: Any) -> Any:
    """A knob's value as one CSV cell (a list as its items separated by spaces)."""
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def deepcache_label(row: dict[str, Any]) -> str:
    """DeepCache's setting of a row in a few words (``no cache`` for the uncached baseline)."""
    if row.get("schedule") in (Schedule.none, None):
        return "no cache"
    what = f"{row['schedule']} N={fmt(row['interval'])} branch {fmt(row['branch'])}"
    if row.get("schedule") == Schedule.nonuniform:
        what += f" c={fmt(row.get('center'))} p={fmt(row.get('power'))}"
    return what


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


def missing_row(job: PlannedJob) -> dict[str, Any]:
    """The row of a job that left no record: its settings as far as they are known (the
    composed settings ``jobs.json`` holds, else its overrides), status ``missing``."""
    if job.settings:
        try:
            settings = _settings_row({"settings": job.settings}, job.settings["cache"])
        except (KeyError, TypeError, AttributeError):
            settings = columns_from_overrides(job.overrides)
    else:
        settings = columns_from_overrides(job.overrides)
    return {**settings, "status": MISSING, "error": MISSING_ERROR, "job": job.job}


def _records(sweep_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    paths = sorted((p for p in sweep_dir.glob(f"*/{RECORD_NAME}") if p.is_file()),
                   key=lambda p: _job_key(p.parent.name))
    return [(p.parent.name, json.loads(p.read_text())) for p in paths]


def load_records(sweep_dir: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(job, record)`` for every ``<sweep_dir>/<job>/run.json``, in job order."""
    sweep_dir = Path(sweep_dir)
    records = _records(sweep_dir)
    if not records:
        raise FileNotFoundError(f"no {RECORD_NAME} under {sweep_dir}/*/")
    return records


def build_table(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job (and one per distinct baseline), sorted by job number; a job the sweep
    launched that has no record is a ``missing`` row (:func:`missing_row`). Raises
    ``FileNotFoundError`` when the sweep has neither a record nor a known job."""
    sweep_dir = Path(sweep_dir)
    records = dict(_records(sweep_dir))
    planned = {j.job: j for j in planned_jobs(sweep_dir)}
    for job in planned.keys() - records.keys():  # a hydra.sweep.subdir deeper than one folder
        if (path := sweep_dir / job / RECORD_NAME).is_file():
            records[job] = json.loads(path.read_text())
    if not records and not planned:
        raise FileNotFoundError(f"no {RECORD_NAME} under {sweep_dir}/*/")
    rows = []
    for job in sorted(set(records) | set(planned), key=_job_key):
        rows += rows_from_record(records[job], job) if job in records else [missing_row(planned[job])]
    df = pd.DataFrame(rows)
    for col in ("schedule", "status"):
        if col not in df:
            df[col] = None
    # a baseline shared by several cached runs appears once
    key = [c for c in SETTING_COLUMNS if c in df.columns]
    is_base = df["schedule"].eq(Schedule.none.value) & df["status"].eq("ok")
    df = pd.concat([df[is_base].drop_duplicates(subset=key), df[~is_base]]).sort_index()
    df = df.dropna(axis=1, how="all")
    if "ablation" in df:  # some row is an ablation: name the others' setting too
        df["ablation"] = df["ablation"].fillna("none")
    if "method" in df:  # some row is another method than DeepCache: name every row's method and setting
        base = df["schedule"].eq(Schedule.none.value)
        df["method"] = df["method"].where(df["method"].notna(), base.map({True: NO_CACHE, False: DEEPCACHE}))
        labels = [deepcache_label(r) for r in df.to_dict("records")]
        labels = pd.Series(labels, index=df.index)
        if "setting" in df:  # a method's label without its name (the method column has it)
            own = [s.removeprefix(f"{m} ") if isinstance(s, str) else s for s, m in zip(df["setting"], df["method"])]
            labels = pd.Series(own, index=df.index).fillna(labels)
        df["setting"] = labels
    # measurements in the order a cached run's record lists them (a baseline has fewer)
    caches = [c for rec in records.values() for c in (rec.get("cache"), (rec.get("settings") or {}).get("cache"))
              if isinstance(c, dict)]
    knobs = list(dict.fromkeys(k for c in caches for k in knob_columns(c) if k in df.columns))
    measured: list[str] = []
    for r in sorted(rows, key=lambda r: r.get("schedule") == Schedule.none):
        measured += [c for c in r if c in df.columns and c not in measured + knobs + SETTING_COLUMNS + TAIL_COLUMNS]
    settings = [c for c in SETTING_COLUMNS if c in df.columns]
    at = settings.index("seed") if "seed" in settings else len(settings)  # a method's knobs before the seed
    order = settings[:at] + knobs + settings[at:] + measured + [c for c in TAIL_COLUMNS if c in df.columns]
    return df[order].reset_index(drop=True)


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def missing_jobs(df: pd.DataFrame) -> list[str]:
    """The jobs of a table that left no record, in table order."""
    if "status" not in df:
        return []
    return list(dict.fromkeys(str(j) for j in df.loc[df["status"].eq(MISSING), "job"]))


def missing_message(jobs: list[str], total: int | None = None) -> str:
    """One line naming the jobs that left no record."""
    of = f" of {total}" if total else ""
    return (f"error: {len(jobs)}{of} jobs left no {RECORD_NAME} (job {', '.join(jobs)}): killed, lost or never "
            "started; their rows in table.csv say missing, and rerunning the sweep command with the same "
            "hydra.sweep.dir finishes them")


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
    if row.get("method") not in (None, DEEPCACHE, NO_CACHE):
        label = str(row.get("label") or row.get("setting") or "")
        what = label if label.startswith(row["method"]) else f"{row['method']} {label}".strip()
    else:
        what = deepcache_label(row)
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
    for key in ("fid", "sfid", "is_mean", "precision", "recall", "clip_score", "psnr", "ssim", "lpips"):
        if row.get(key) is not None:
            parts.append(f"{key} {fmt(row[key])}")
    return " | ".join(parts)


def print_summary(df: pd.DataFrame, file=None) -> None:
    """The sweep's rows, one line each, failed rows with their error, missing rows marked
    (on ``file``, by default the ``sys.stdout`` of the moment)."""
    file = file or sys.stdout
    for _, r in df.iterrows():
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        if row.get("status") == "ok":
            line = format_row(row)
        elif row.get("status") == MISSING:
            line = f"MISSING {_what(row)}: no {RECORD_NAME} (killed, lost or never started)"
        else:
            what = row.get("setting") or row.get("method") or f"{row.get('schedule')} N={fmt(row.get('interval'))}"
            line = f"FAILED {what}: {row.get('error')}"
        print(f"  [{row.get('job')}] {line}", file=file)


def _what(row: dict[str, Any]) -> str:
    """A missing row's known settings, briefly."""
    parts = [f"{c}={fmt(row[c])}" for c in ("sampler", "steps", "schedule", "interval", "branch", "center", "power")
             if row.get(c) is not None]
    return " ".join(parts) or "settings unknown"
