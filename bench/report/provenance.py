"""What produced a sweep's rows, read from its records: the command that reruns it, the
code and libraries, the machine, the samples, seeds and reference statistics, the compute.

Used by :mod:`bench.report.document` (``python -m bench.report <sweep_dir> ... --out <dir>``).
Everything here comes from the sweep directory alone:

* ``<job>/run.json`` (:mod:`bench.report.records`): ``settings`` (the composed config),
  ``environment`` (``harness_commit`` -- ``-dirty`` when the tree had uncommitted changes --,
  versions, device, threads, ``time_utc``, ``argv``: the process's command line),
  ``wall_time_s``, ``measurements`` (``protocol``, ``reference_sha256``);
* ``multirun.yaml``: what Hydra swept, ``hydra.overrides.task`` (the overrides as typed)
  and ``hydra.overrides.hydra``;
* ``jobs.json`` or the jobs' ``.hydra/overrides.yaml`` (:func:`bench.report.jobs.planned_jobs`):
  each job's own override list.

The rerun command (:func:`sweep_command`) is the sweep's command line as it was given:
Hydra's record of the overrides (``multirun.yaml``), with the config flags of the
process's ``argv`` (``--config-name`` and friends are not overrides, Hydra keeps them out
of ``multirun.yaml``), and ``hydra.sweep.dir`` set to a fresh folder so that the rerun
neither overwrites nor resumes the original. The same overrides at the same commit
compose the same settings, hence the same seeds, schedules and rows; the document
names the commit (and says when the tree was dirty, which no checkout restores).
"""

from __future__ import annotations

import itertools
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.report.jobs import PlannedJob
from bench.report.records import PACKAGES

MULTIRUN_NAME = "multirun.yaml"
ENTRY = "python run.py"  # the checkout's entry point (run.py); `deepcache-bench` is the same program
RERUN_SUFFIX = "-rerun"
# Hydra's command-line flags that take a value and change what is composed (not overrides)
CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
MULTIRUN_FLAGS = ("-m", "--multirun")
# overrides of Hydra's own config that the rerun command replaces or implies
DROPPED_HYDRA = ("hydra.sweep.dir", "hydra.mode", "hydra.run.dir")

Records = list[tuple[str, dict[str, Any]]]


# ------------------------------------------------------------------------------------- command


@dataclass
class Command:
    """How to rerun a sweep: ``lines`` are shell commands, run in order from the repository root."""

    lines: list[str]
    source: str  # where the overrides came from
    rerun_dir: str | None  # where the rerun's records land
    notes: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def read_multirun(sweep_dir: str | Path) -> dict[str, Any] | None:
    """``<sweep_dir>/multirun.yaml`` (Hydra's config of the sweep), or None when absent or unreadable."""
    path = Path(sweep_dir) / MULTIRUN_NAME
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _split_argv(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(config flags with their values, overrides, is a multirun) of a Hydra command line."""
    flags, overrides, multirun = [], [], False
    words = iter(argv)
    for w in words:
        if w in MULTIRUN_FLAGS:
            multirun = True
        elif w in CONFIG_FLAGS:
            flags += [w, next(words, "")]
        elif w.split("=", 1)[0] in CONFIG_FLAGS:
            flags.append(w)
        elif not w.startswith("-"):
            overrides.append(w)
    return flags, overrides, multirun


def _argv_of(records: Records) -> list[str] | None:
    """The process command line the records agree on (None: none recorded, or they differ)."""
    argvs = {tuple(a) for _, r in records if isinstance(a := (r.get("environment") or {}).get("argv"), list)}
    return list(next(iter(argvs))) if len(argvs) == 1 else None


def _quote(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def rerun_dir_for(sweep_dir: str | Path, multirun: dict[str, Any] | None) -> str:
    """A fresh sweep folder for the rerun: the original's (as Hydra recorded it) + ``-rerun``."""
    recorded = ((multirun or {}).get("hydra") or {}).get("sweep", {}).get("dir")
    base = str(recorded) if recorded and "${" not in str(recorded) else str(sweep_dir)
    return base.rstrip("/") + RERUN_SUFFIX


def sweep_command(sweep_dir: str | Path, records: Records, planned: list[PlannedJob]) -> Command:
    """The command that reruns the sweep into a fresh folder (see the module docstring); from
    ``multirun.yaml``, else a multirun ``argv`` of the records, else the jobs' override lists."""
    sweep_dir = Path(sweep_dir)
    multirun = read_multirun(sweep_dir)
    rerun = rerun_dir_for(sweep_dir, multirun)
    argv = _argv_of(records)
    flags, argv_overrides, argv_multirun = _split_argv(argv) if argv is not None else ([], [], False)
    notes: list[str] = []
    overrides_of_hydra = ((multirun or {}).get("hydra") or {}).get("overrides") or {}
    task = overrides_of_hydra.get("task")
    if isinstance(task, list):
        extra = [str(o) for o in overrides_of_hydra.get("hydra") or [] if _override_key(str(o)) not in DROPPED_HYDRA]
        words = [str(o) for o in task] + extra
        if argv is not None and argv_multirun:
            if sorted(o for o in argv_overrides if _override_key(o) not in DROPPED_HYDRA) != sorted(words):
                notes.append("the records' command line (" + _quote(argv) + ") differs from Hydra's record of the "
                             "sweep; the command follows multirun.yaml")
        elif argv is not None:
            notes.append("the records' command line is not the sweep's (a launcher ran the jobs): " + _quote(argv))
        line = _join(ENTRY, flags if argv_multirun else [], ["-m"], words, [f"hydra.sweep.dir={rerun}"])
        return Command([line], MULTIRUN_NAME, rerun, notes)
    if argv is not None and argv_multirun:
        kept = [w for w in argv if _override_key(w) not in DROPPED_HYDRA]
        return Command([_join(ENTRY, kept, [f"hydra.sweep.dir={rerun}"])], "run.json environment.argv", rerun,
                       ["the sweep has no multirun.yaml; the command is the process's command line"])
    job_overrides = [j.overrides for j in planned if j.overrides]
    if job_overrides and len(job_overrides) == len(planned):
        grid = _as_grid(job_overrides)
        if grid is not None:
            return Command([_join(ENTRY, ["-m"], grid, [f"hydra.sweep.dir={rerun}"])], "the jobs' overrides", rerun,
                           ["the sweep has no multirun.yaml; the command sweeps the grid its jobs' overrides form"])
        lines = [_join(ENTRY, j.overrides, [f"hydra.run.dir={rerun}/{j.job}"]) for j in planned]
        lines.append(f"python -m bench.report {shlex.quote(rerun)}")
        return Command(lines, "the jobs' overrides", rerun,
                       ["the sweep has no multirun.yaml and its jobs form no grid: one run per job, then the table"])
    return Command([], "nothing", None, ["no command can be reconstructed: the sweep keeps neither multirun.yaml, "
                                         "a command line nor its jobs' overrides"])


def _join(entry: str, *parts: list[str]) -> str:
    words = [w for p in parts for w in p]
    return entry + (" " + _quote(words) if words else "")


def _as_grid(jobs: list[list[str]]) -> list[str] | None:
    """The sweep overrides whose grid is exactly these jobs (``key=a,b`` per varying key), or
    None when the jobs are not a full grid (or a value holds a comma, Hydra's sweep separator)."""
    keyed = []
    for overrides in jobs:
        d: dict[str, str] = {}
        for o in overrides:
            key, eq, value = o.partition("=")
            if not eq or "," in value or key in d:
                return None
            d[key] = value
        keyed.append(d)
    keys = list(dict.fromkeys(k for d in keyed for k in d))
    if any(set(d) != set(keys) for d in keyed):
        return None
    values = {k: list(dict.fromkeys(d[k] for d in keyed)) for k in keys}
    expected = {tuple(combo) for combo in itertools.product(*(values[k] for k in keys))}
    got = [tuple(d[k] for k in keys) for d in keyed]
    if len(got) != len(set(got)) or set(got) != expected:
        return None
    return [f"{k}={','.join(values[k])}" for k in keys]


# ---------------------------------------------------------------------------------- provenance


def _env(rec: dict[str, Any]) -> dict[str, Any]:
    return rec.get("environment") or {}


def _settings(rec: dict[str, Any]) -> dict[str, Any]:
    return rec.get("settings") or {}


def _distinct(values) -> list[Any]:
    """The distinct values in first-seen order, None left out."""
    return list(dict.fromkeys(v for v in values if v is not None))


def packages(rec: dict[str, Any]) -> dict[str, str | None]:
    """The record's package versions: ``environment.packages`` (records since it exists), with
    ``torch`` and ``diffusers`` as the modules report themselves (``torch.__version__`` carries
    the build, e.g. ``+cu121``, which the distribution's version lacks; older records carry only
    these two); a package not recorded is absent."""
    env = _env(rec)
    out = dict(env.get("packages") or {})
    for name in ("torch", "diffusers"):
        if env.get(name) is not None:
            out[name] = env[name]
    return out


def is_gpu(device: str | None) -> bool:
    return bool(device) and str(device).startswith("cuda")


def processes(rec: dict[str, Any]) -> int:
    """How many processes (GPUs, under torchrun) ran the record's run."""
    return int((rec.get("distributed") or {}).get("world_size") or 1)


@dataclass
class Compute:
    wall_s: float  # summed over the records (failed runs spent it too)
    hours: float  # device-hours: wall time x processes
    unit: str  # "GPU-hours" | "CPU-hours"


def compute(records: Records) -> Compute:
    """Wall time and device-hours of a sweep: the sum of its records' ``wall_time_s`` (times
    the processes of a torchrun run); GPU-hours when the runs were on a GPU, else CPU-hours
    (a CPU run's wall time, whatever its threads)."""
    wall = sum(float(r.get("wall_time_s") or 0.0) for _, r in records)
    hours = sum(float(r.get("wall_time_s") or 0.0) * processes(r) for _, r in records) / 3600
    gpu = any(is_gpu(_env(r).get("device")) for _, r in records)
    return Compute(wall, hours, "GPU-hours" if gpu else "CPU-hours")


def reference_description(settings: dict[str, Any]) -> str | None:
    """Which reference the quality config scores against: its file or folder, else the model's
    default (the callable that makes it); None when the quality config names no reference."""
    q = settings.get("quality") or {}
    if not isinstance(q, dict):
        return None
    ref = q.get("reference")
    if ref:
        return f"file {ref}" if not isinstance(ref, dict) else _call(ref)
    default = q.get("default_reference")
    if isinstance(default, dict):
        return "the model's default, " + _call(default)
    if default:
        return f"the model's default, {default}"
    return None


def _call(d: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in d.items() if not str(k).startswith("_"))
    return f"{d.get('_target_', '?')}({args})"


def _measurement_sets(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurements of a record: the run's and its baseline's."""
    out = [rec.get("measurements") or {}]
    if isinstance(rec.get("baseline"), dict):
        out.append(rec["baseline"].get("measurements") or {})
    return out


@dataclass
class Provenance:
    """What produced one sweep's records (each field: the distinct values, first seen first)."""

    jobs: int
    ok: int
    failed: int
    commits: list[str]
    record_versions: list[Any]
    packages: dict[str, list[str]]  # name -> versions (["not installed"] when recorded as absent)
    python: list[str]
    devices: list[str]
    device_names: list[str]
    world_sizes: list[int]
    dtypes: list[str]
    threads: list[int]
    timing_threads: list[int]
    dates: tuple[str, str] | None  # first and last record's time_utc
    compute: Compute
    modes: list[str]
    num_samples: list[int]  # images per row (runs that made images)
    seeds: list[int]
    protocols: list[str]
    references: list[str]
    reference_hashes: list[str]
    quality_scored: bool  # some record holds quality measurements
    models: list[str]  # model name, source and weights fingerprint
    timing_warnings: int  # records whose timing warned (e.g. a busy machine)

    @property
    def dirty(self) -> bool:
        return any(c.endswith("-dirty") for c in self.commits)


def provenance(records: Records, planned_count: int = 0) -> Provenance:
    """The provenance of a sweep's records (see :class:`Provenance`)."""
    recs = [r for _, r in records]
    ok = [r for r in recs if r.get("status", "ok") == "ok"]
    versions: dict[str, list[str]] = {}
    for r in recs:
        for name, v in packages(r).items():
            versions.setdefault(name, [])
            text = "not installed" if v is None else str(v)
            if text not in versions[name]:
                versions[name].append(text)
    order = [p for p in PACKAGES if p in versions] + [p for p in versions if p not in PACKAGES]
    times = sorted(t for r in recs if (t := _env(r).get("time_utc")))
    imaging = [r for r in ok if r.get("mode") in ("full", "generate")]
    measurements = [m for r in ok for m in _measurement_sets(r)]
    scored = [r for r in ok if any("protocol" in m for m in _measurement_sets(r))]
    return Provenance(
        jobs=max(planned_count, len(recs)),
        ok=len(ok),
        failed=sum(r.get("status") == "failed" for r in recs),
        commits=_distinct(_env(r).get("harness_commit") or "unknown" for r in recs),
        record_versions=_distinct(r.get("record_version") for r in recs),
        packages={p: versions[p] for p in order},
        python=_distinct(_env(r).get("python") for r in recs),
        devices=_distinct(_env(r).get("device") for r in recs),
        device_names=_distinct(_env(r).get("device_name") for r in recs),
        world_sizes=_distinct(processes(r) for r in recs),
        dtypes=_distinct((_settings(r).get("run") or {}).get("dtype") for r in recs),
        threads=_distinct(_env(r).get("threads") for r in recs),
        timing_threads=_distinct((r.get("timing") or {}).get("threads") for r in ok),
        dates=(times[0], times[-1]) if times else None,
        compute=compute(records),
        modes=_distinct(r.get("mode") for r in recs),
        num_samples=_distinct(r.get("num_samples", (_settings(r).get("run") or {}).get("num_samples"))
                              for r in imaging),
        seeds=_distinct((_settings(r).get("run") or {}).get("seed") for r in recs),
        protocols=_distinct(m.get("protocol") for m in measurements),
        references=_distinct(reference_description(_settings(r)) for r in scored),
        reference_hashes=_distinct(m.get("reference_sha256") for m in measurements),
        quality_scored=bool(scored),
        models=_distinct(_model(r) for r in ok),
        timing_warnings=sum(bool((r.get("timing") or {}).get("warning")) for r in ok),
    )


def _model(rec: dict[str, Any]) -> str:
    name = (_settings(rec).get("model") or {}).get("name", "?")
    parts = [p for p in (rec.get("model_source"), rec.get("weights_fingerprint") and
                         f"weights {rec['weights_fingerprint']}") if p]
    return f"{name} ({', '.join(parts)})" if parts else str(name)


def mixed(records: Records) -> list[str]:
    """Lines saying that the records come from several commits or record versions (empty when
    they do not): results of different code are not one table."""
    out = []
    commits = Counter(_env(r).get("harness_commit") or "unknown" for _, r in records)
    if len(commits) > 1:
        out.append("records from " + str(len(commits)) + " commits: "
                   + ", ".join(f"{c} ({n} records)" for c, n in commits.items()))
    versions = Counter(str(r.get("record_version", "unknown")) for _, r in records)
    if len(versions) > 1:
        out.append("records of " + str(len(versions)) + " harness record versions: "
                   + ", ".join(f"record_version {v} ({n} records)" for v, n in versions.items()))
    return out
