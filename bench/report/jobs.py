"""The jobs a sweep launched, so that a job that left no ``run.json`` is a row, not a gap.

A table built from the records alone cannot tell a complete sweep from one whose job was
killed by its scheduler, lost with its node or never started: the job is simply absent.
This module says which jobs there were, from the best source the sweep directory has:

1. ``jobs.json``: written by the table sweeper (:func:`bench.run.sweeper.run_sweep`)
   before the first job starts -- every job's folder name, number, override list and
   composed settings (as its ``run.json`` would carry them);
2. else the job folders Hydra made when each job started,
   ``<sweep_dir>/<job>/.hydra/overrides.yaml`` (a search sweep's trials, which are not
   known up front, and sweeps made before ``jobs.json`` existed);
3. else nothing: only the records are known (a sweep whose jobs ran without Hydra's
   output folders).

``jobs.json``::

    {"jobs": [{"job": "0", "num": 0, "overrides": ["cache.interval=2", ...],
               "settings": {"model": {...}, "sampler": {...}, "cache": {...}, "run": {...}, ...}},
              ...]}

``settings`` may be absent (a config that could not be resolved up front); the
overrides then say what they can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metrics.files import atomic_write_bytes

JOBS_NAME = "jobs.json"
OVERRIDES_PATH = ".hydra/overrides.yaml"  # what Hydra writes into every job folder when the job starts


@dataclass
class PlannedJob:
    job: str  # the job's folder name under the sweep directory (Hydra's hydra.sweep.subdir)
    overrides: list[str] = field(default_factory=list)
    settings: dict[str, Any] | None = None  # the composed settings, as run.json's "settings"
    num: int | None = None


def write_jobs(sweep_dir: str | Path, jobs: list[PlannedJob]) -> Path:
    """Write ``<sweep_dir>/jobs.json`` atomically."""
    entries = []
    for j in jobs:
        entry: dict[str, Any] = {"job": j.job, "num": j.num, "overrides": list(j.overrides)}
        if j.settings is not None:
            entry["settings"] = j.settings
        entries.append(entry)
    text = json.dumps({"jobs": entries}, indent=1, default=str) + "\n"
    return atomic_write_bytes(Path(sweep_dir) / JOBS_NAME, text.encode())


def planned_jobs(sweep_dir: str | Path) -> list[PlannedJob]:
    """The jobs the sweep launched: from ``jobs.json``, else from the job folders Hydra made,
    else none (see the module docstring)."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / JOBS_NAME
    if path.is_file():
        data = json.loads(path.read_text())
        return [PlannedJob(str(e["job"]), [str(o) for o in e.get("overrides") or []], e.get("settings"), e.get("num"))
                for e in data.get("jobs") or []]
    jobs = []
    for p in sorted(sweep_dir.glob(f"*/{OVERRIDES_PATH}")):
        job_dir = p.parent.parent
        try:
            overrides = yaml.safe_load(p.read_text()) or []
        except (OSError, yaml.YAMLError):
            overrides = []
        jobs.append(PlannedJob(job_dir.name, [str(o) for o in overrides] if isinstance(overrides, list) else []))
    return jobs


# override key -> table column (bench.report.table.SETTING_COLUMNS), for a job known only by its overrides
OVERRIDE_COLUMNS = {
    "model": "model", "model.name": "model",
    "prompts": "prompts", "run.prompts.name": "prompts",
    "model.weights": "weights",
    "sampler": "sampler", "sampler.name": "sampler",
    "sampler.steps": "steps",
    "cache.schedule": "schedule", "cache.interval": "interval", "cache.branch": "branch",
    "cache.center": "center", "cache.power": "power", "cache.ablation": "ablation", "cache": "method",
    "run.seed": "seed", "run.num_samples": "num_samples",
}


def columns_from_overrides(overrides: list[str]) -> dict[str, Any]:
    """The table's setting columns that a job's override list sets (``key=value``, Hydra's
    ``+``/``++`` prefixes allowed; deletions and other keys ignored); the last one wins."""
    out: dict[str, Any] = {}
    for o in overrides:
        key, eq, text = o.partition("=")
        key = key.lstrip("+")
        if not eq or key.startswith("~") or key not in OVERRIDE_COLUMNS:
            continue
        out[OVERRIDE_COLUMNS[key]] = _value(text)
    return out


def _value(text: str) -> Any:
    """An override's value as YAML reads it (``10`` an int, ``1.2`` a float, ``null`` None)."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if v is None or isinstance(v, (bool, int, float, str)) else text
