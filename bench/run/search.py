"""Searching the non-uniform schedule's (c, p, branch) with Optuna (``hydra/sweeper=search``).

Supplementary Tables 7-10 of the paper choose the non-uniform schedule's center c and
power p by sweeping a grid (``conf/experiment/``). This is the other way: Hydra's Optuna
sweeper plugin (hydra-optuna-sweeper; Optuna's TPE sampler by default) proposes
(c, p, branch) trials, and each trial returns the objective of its cached run:

* the run's quality measurement named by ``hydra.sweeper.objective`` (``fid`` by
  default, minimised; ``hydra.sweeper.direction=maximize`` for ``is_mean``,
  ``precision``, ``clip_score``, ...),
* or the worst value (+inf when minimising, -inf when maximising) when the trial's
  speed-up is below ``hydra.sweeper.min_speedup``. With ``hydra.sweeper.speedup=macs``
  (default) that is the MACs-predicted speed-up (full-call MACs / average MACs per
  call): noise-free, and known before any image is generated, so a trial below the
  floor costs one MACs count and records only its cost. ``speedup=measured`` uses the
  measured ``speedup`` of the run's timing (``run.timing`` must not be ``off``).

The sweeper (``hydra_plugins/deepcache_bench/search_sweeper.py``) checks the search
space's corners before the first trial and writes ``table.csv`` when the search ends,
as the harness's table sweeper does; Optuna writes ``optimization_results.yaml`` (the
best parameters and value) into the same directory. Each trial's record carries a
``search`` entry: objective, value, speed-up and floor.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from bench.core.errors import HarnessError
from bench.core.options import Mode, Timing, value
from bench.report.records import write_record

SWEEPER = "hydra_plugins.deepcache_bench.search_sweeper.SearchSweeper"
SPEEDUPS = ("macs", "measured")


def in_use(sweeper_cfg: Any) -> bool:
    """Whether the run is a trial of the search sweeper (``hydra.sweeper`` of its Hydra config)."""
    return OmegaConf.select(sweeper_cfg, "_target_", default=None) == SWEEPER


def check_settings(objective: Any, min_speedup: Any, speedup: Any, direction: Any, timing: Any) -> None:
    """The search's own settings (``hydra.sweeper.*``), one line naming the bad one."""
    if not isinstance(objective, str) or not objective:
        raise HarnessError(f"hydra.sweeper.objective={objective!r} must name a measurement, e.g. fid")
    if speedup not in SPEEDUPS:
        raise HarnessError(f"hydra.sweeper.speedup={speedup!r} must be one of {', '.join(SPEEDUPS)}")
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, (int, float)) or not min_speedup >= 0:
        raise HarnessError(f"hydra.sweeper.min_speedup={min_speedup!r} must be a number >= 0 (1: no floor)")
    if str(direction) not in ("minimize", "maximize"):
        raise HarnessError(f"hydra.sweeper.direction={direction!r} must be minimize or maximize (one objective)")
    if speedup == "measured" and value(timing) == Timing.off:
        raise HarnessError("hydra.sweeper.speedup=measured needs the run's timing: run.timing=auto|loop|calls, "
                           "or hydra.sweeper.speedup=macs")


def objective(cfg: Any, out_dir: str | Path, sweeper_cfg: Any) -> float:
    """Run one trial and return its objective (see the module docstring)."""
    from bench.run.runner import run

    name, floor, speedup = sweeper_cfg.objective, float(sweeper_cfg.min_speedup), sweeper_cfg.speedup
    worst = math.inf if str(sweeper_cfg.direction) == "minimize" else -math.inf
    if speedup == "macs":  # the floor first, from a cost run: no image for a trial below it
        rec = json.loads(run(_cost_only(cfg), out_dir).read_text())
        predicted = rec["measurements"]["macs_predicted_speedup"]
        if predicted < floor:
            return _note(out_dir, rec, name, worst, predicted, floor, speedup)
    path = run(cfg, out_dir)
    rec = json.loads(path.read_text())
    m = rec.get("measurements", {})
    key = "macs_predicted_speedup" if speedup == "macs" else "speedup"
    if name not in m or key not in m:
        missing = name if name not in m else key
        error = (f"hydra.sweeper.objective={name}: the run has no measurement {missing!r} "
                 f"(run.mode={rec.get('mode')}; its measurements: {', '.join(sorted(m))})")
        rec.update(status="failed", error=error)  # the run is done, but the trial failed
        rec.pop("record_version", None)
        write_record(out_dir, rec)
        raise HarnessError(error)
    if m[key] < floor:
        return _note(out_dir, rec, name, worst, m[key], floor, speedup)
    return _note(out_dir, rec, name, float(m[name]), m[key], floor, speedup)


def _cost_only(cfg: Any) -> Any:
    cost = copy.deepcopy(cfg)
    with open_dict(cost):
        cost.run.mode = Mode.cost.value
        cost.run.timing = Timing.off.value
    return cost


def _note(out_dir: str | Path, rec: dict[str, Any], name: str, value: float, speed: float, floor: float,
          speedup: str) -> float:
    """Add the trial's outcome to its record; return the value."""
    rec["search"] = {"objective": name, "value": value, "speedup": speed, "speedup_kind": speedup,
                     "min_speedup": floor, "feasible": speed >= floor}
    rec.pop("record_version", None)
    write_record(out_dir, rec)
    return value
