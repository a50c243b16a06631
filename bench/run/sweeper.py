"""The harness's Hydra sweeper (``hydra_plugins.deepcache_bench``): Hydra's basic sweeper,
plus three things a table needs.

* ``hydra.sweeper.grids``: a list of parameter grids, each expanded as a cartesian
  product and run one after the other, so that a table combining differently shaped
  runs (e.g. PLMS at several step counts *and* DeepCache at several N) is one
  command. Command-line values override a grid's value of the same key.
* Every point of the sweep is composed and checked (:func:`bench.run.validate.check`)
  before the first job starts; bad points are listed, one line each, and nothing runs.
  Then the list of jobs is written into the sweep directory (``jobs.json``,
  :mod:`bench.report.jobs`), so that a job that never leaves a record is a ``missing``
  row of the table, not a gap.
* When the jobs are done -- also when some of them failed -- the sweep's
  ``table.csv`` is written from the run records (and any paper table the experiment
  describes is rendered). This does not depend on Hydra's end-of-multirun callback,
  which Hydra skips when a job fails. Failed and missing jobs are listed and the
  command exits 1.

Any Hydra launcher runs the jobs: the basic one (in this process) or the submitit
launcher (``hydra/launcher=slurm|local``, ``conf/hydra/launcher/``). A job that
raises comes back as a ``JobReturn`` with status ``FAILED`` from either, and its
record says why. A job that ends without a result -- killed by SLURM at its time or
memory limit, a lost node -- makes the submitit launcher raise instead
(``submitit.core.utils.UncompletedJobError``): then every job of the batch that left
no record gets a failure record written for it, so its row is marked failed too.
Under ``torchrun`` only rank 0 writes ``multirun.yaml``, ``jobs.json`` and the table.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf, open_dict, read_write

from bench.core.errors import HarnessError, one_line
from bench.core.options import Mode, value
from bench.report.jobs import PlannedJob, write_jobs
from bench.report.records import RECORD_NAME, RECORD_VERSION
from bench.report.sweep import write_tables
from bench.report.table import print_summary
from bench.run.distributed import is_main_process


def job_overrides(params: dict[str, str] | None, grids: list[dict[str, Any]] | None,
                  arguments: list[str]) -> list[list[str]]:
    """The override list of every job: each grid's cartesian product (with ``params`` and the
    command line's ``arguments``, which win over a grid's value of the same key), in order,
    duplicates removed."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = OverridesParser.create()
    jobs: list[list[str]] = []
    for grid in grids or [{}]:
        merged = {**(params or {}), **{k: _sweep_string(v) for k, v in grid.items()}}
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in merged.items()] + list(arguments))
        for job in BasicSweeper.split_arguments(overrides, None)[0]:
            if job not in jobs:
                jobs.append(job)
    return jobs


def check_jobs(sweeper: Any, jobs: list[list[str]]) -> list[Any]:
    """Compose and check every job's config; exit 2 listing the bad ones before any runs.
    Returns the composed configs (Hydra's part included), in job order."""
    from bench.run.validate import check

    loader = sweeper.hydra_context.config_loader
    problems, cfgs = [], []
    for i, job in enumerate(jobs):
        cfg = loader.load_sweep_config(master_config=sweeper.config, sweep_overrides=list(job))
        cfgs.append(cfg)
        try:
            check(cfg)
        except HarnessError as e:
            problems.append(f"error: job #{i} ({' '.join(job)}): {e}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"error: {len(problems)} of {len(jobs)} sweep points are invalid; nothing was run", file=sys.stderr)
        sys.exit(2)
    return cfgs


def planned(jobs: list[list[str]], cfgs: list[Any]) -> list[PlannedJob]:
    """What ``jobs.json`` lists: each job's folder name (``hydra.sweep.subdir`` with its job
    number, as the launcher will set it), number, overrides and settings (as its
    ``run.json`` will carry them; left out when they cannot be resolved up front)."""
    from bench.run.runner import settings_record

    out = []
    for i, (job, cfg) in enumerate(zip(jobs, cfgs)):
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = i
        try:
            settings = settings_record(_without_hydra(cfg))
        except Exception:  # noqa: BLE001 -- the job itself will say what is wrong
            settings = None
        out.append(PlannedJob(str(cfg.hydra.sweep.subdir), list(job), settings, i))
    return out


def run_sweep(sweeper: Any, arguments: list[str]) -> Any:
    """The sweep: jobs from the grids, all checked, launched batch by batch, then the table."""
    jobs = job_overrides(sweeper.params, sweeper.grids, arguments)
    cfgs = check_jobs(sweeper, jobs)
    if any(value(c.run.mode) == Mode.plan for c in cfgs):
        return plan_sweep(sweeper, jobs, cfgs)
    sweeper.overrides = list(sweeper.split_overrides_to_chunks(jobs, sweeper.max_batch_size))
    sweep_dir = Path(sweeper.config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    main = is_main_process()
    if main:
        OmegaConf.save(sweeper.config, sweep_dir / "multirun.yaml")
        write_jobs(sweep_dir, planned(jobs, cfgs))  # before the first job: a job that leaves no record is a row

    returns, failed, start = [], [], 0
    while not sweeper.is_done():
        batch = sweeper.get_job_batch()
        try:
            results = sweeper.launcher.launch(batch, initial_job_idx=start)
        except Exception as e:  # a job ended without a result (submitit: killed, lost)
            for i in record_lost_jobs(sweeper, batch, start, e):
                failed.append(f"job #{i} ({' '.join(batch[i - start])}): no result ({_launcher_error(e)})")
            start += len(batch)
            continue
        for i, r in enumerate(results):
            if r.status == JobStatus.FAILED:
                failed.append(f"job #{start + i} ({' '.join(batch[i])}): {one_line(r._return_value)}")
        start += len(batch)
        returns.append(results)
    if not main:
        sys.exit(1 if failed else 0)  # rank > 0 of a torchrun sweep: rank 0 writes the table
    missing = finish(sweep_dir)
    if failed:
        print("\n".join(f"error: {line}" for line in failed), file=sys.stderr)
        print(f"error: {len(failed)} of {len(jobs)} jobs failed; their rows in table.csv say why, "
              "and a rerun redoes only what is missing", file=sys.stderr)
    if failed or missing:
        sys.exit(1)
    return returns


def plan_sweep(sweeper: Any, jobs: list[list[str]], cfgs: list[Any]) -> list[Any]:
    """``run.mode=plan``: the plan of every job (:mod:`bench.run.plan`), printed and written into
    the sweep directory; no job is launched."""
    from bench.run.plan import PLAN_CSV, plan_jobs, summary, write_plan

    if not all(value(c.run.mode) == Mode.plan for c in cfgs):
        print("error: run.mode=plan plans the whole sweep: set it for every job, not as a swept value",
              file=sys.stderr)
        sys.exit(2)
    try:
        plan = plan_jobs(cfgs, [str(i) for i in range(len(jobs))])
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(plan))
    if is_main_process():
        path = write_plan(Path(str(sweeper.config.hydra.sweep.dir)), plan)
        print(f"plan: {path.parent / PLAN_CSV}")
    return []


def record_lost_jobs(sweeper: Any, batch: list[list[str]], start: int, error: BaseException) -> list[int]:
    """Write a failure record for every job of ``batch`` that has none (it ended without a
    result); returns their job numbers. A record that appears meanwhile is never replaced,
    and a job still running replaces this one when it ends."""
    from bench.run.runner import settings_record

    lost = []
    for i, job in enumerate(batch):
        cfg = sweeper.hydra_context.config_loader.load_sweep_config(sweeper.config, list(job))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = start + i
        job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        record = {
            "record_version": RECORD_VERSION, "status": "failed", "mode": str(cfg.run.mode),
            "error": (f"no result from the launcher ({_launcher_error(error)}): a job that was killed (time "
                      "or memory limit) or never started leaves none, and a rerun generates only the missing "
                      "samples; a job still running replaces this record when it ends"),
            "settings": settings_record(_without_hydra(cfg)),
        }
        if _write_new(job_dir / RECORD_NAME, json.dumps(record, indent=2, default=str) + "\n"):
            lost.append(start + i)
    return lost


def _without_hydra(cfg: Any) -> Any:
    """The job's own settings, as its task function would have seen them."""
    cfg = copy.deepcopy(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _write_new(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists (atomically: a hard link of a
    complete temp file); False when it existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finish(sweep_dir: Path) -> list[str]:
    """Write ``table.csv`` (and the experiment's paper table, if any) and print the rows.
    Returns the jobs that left no record (their rows say ``missing``; one line on stderr
    names them): the sweep then exits 1, as ``python -m bench.report`` does."""
    try:
        tables = write_tables(sweep_dir)
    except FileNotFoundError as e:
        print(f"table: not written ({e})", file=sys.stderr)
        return []
    print_summary(tables.table)
    print(f"table: {tables.path}")
    for out in tables.paper:
        print(f"paper table: {out}")
    if tables.missing:
        print(tables.missing_line(), file=sys.stderr)
    return tables.missing


def _sweep_string(v: Any) -> str:
    """A grid value as sweep syntax: lists become ``a,b,c``."""
    if isinstance(v, (list, tuple)) or OmegaConf.is_list(v):
        return ",".join(str(x) for x in v)
    return str(v)


def _launcher_error(e: BaseException) -> str:
    """A launcher's exception in one line: its type and first two lines (submitit's name the
    job and say what became of it; the rest is its log)."""
    head = " ".join(" ".join(str(e).strip().splitlines()[:2]).split())
    return f"{type(e).__name__}: {head}" if head else type(e).__name__
