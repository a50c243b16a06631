"""The ``search`` sweeper (``hydra/sweeper=search``, ``conf/hydra/sweeper/search.yaml``):
Hydra's Optuna sweeper plugin, plus what the harness's sweeps do -- the search space
checked before the first trial, ``table.csv`` written when the search ends (also when it
fails). The objective of a trial is :func:`bench.run.search.objective`.

Optuna and its Hydra plugin (the ``search`` extra) are imported only when this sweeper
is used, so plugin discovery works without them.

Unlike the table sweeper, it writes no ``jobs.json``: Optuna proposes each trial from
the ones before, so the trials are not known up front. The trial folders Hydra makes
when a trial starts (``<sweep_dir>/<n>/.hydra/overrides.yaml``) are the list of jobs
(:mod:`bench.report.jobs`): a trial that started and left no ``run.json`` is a
``missing`` row of ``table.csv``, and the search exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SearchSweeper(Sweeper):
    """Optuna search of the settings in ``params`` (and sweep overrides on the command line)
    for the best ``objective`` above a speed-up floor; see :mod:`bench.run.search`."""

    def __init__(self, objective: str = "fid", min_speedup: float = 1.0, speedup: str = "macs",
                 **optuna: Any) -> None:
        import logging

        logging.getLogger("alembic").setLevel(logging.WARNING)  # optuna's storage imports it, noisily
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.objective, self.min_speedup, self.speedup = objective, min_speedup, speedup
        self.direction = optuna.get("direction")
        self.params = dict(optuna.get("params") or {})
        self.optuna = OptunaSweeper(**optuna)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from bench.run import distributed
        from bench.run import search
        from bench.core.errors import HarnessError
        from bench.run.sweeper import check_jobs, finish

        assert self.config is not None
        try:
            if str(self.config.run.mode) == "plan":
                raise HarnessError("run.mode=plan needs the sweep's jobs up front; a search picks its trials as "
                                   "it goes: plan a grid sweep of the same space (hydra/sweeper=table) instead")
            if distributed.launched():
                raise HarnessError("hydra/sweeper=search runs one process per trial: not under torchrun "
                                   "(hydra/launcher=slurm runs trials in parallel)")
            search.check_settings(self.objective, self.min_speedup, self.speedup, self.direction,
                                  self.config.run.timing)
        except HarnessError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        check_jobs(self, corner_jobs(self.params, arguments))  # exits 2 listing bad corners
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            result = self.optuna.sweep(arguments)
        except HarnessError as e:  # a failed trial, re-raised by the Optuna sweeper (max_failure_rate)
            finish(sweep_dir)
            print(f"error: the search stopped at a failed trial ({e}); its row in table.csv says why "
                  "(hydra.sweeper.max_failure_rate lets a share of trials fail)", file=sys.stderr)
            sys.exit(1)
        except BaseException:
            finish(sweep_dir)  # the trials done so far
            raise
        if finish(sweep_dir):  # a trial left no record: its row says missing
            sys.exit(1)
        return result


def corner_jobs(params: dict[str, Any], arguments: list[str]) -> list[list[str]]:
    """Override lists that put each searched setting at each end of its range (every value of
    a choice), the others at their lower end: the points :func:`bench.run.sweeper.check_jobs`
    checks before the first trial. A command-line override of a key replaces ``params``'."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(arguments))
    last: dict[str, Override] = {}
    for o in parsed:
        last[o.get_key_element()] = o
    fixed = [f"{k}={o.get_value_element_as_str()}" for k, o in last.items() if not o.is_sweep_override()]
    ends = {k: _ends(o) for k, o in last.items() if o.is_sweep_override()}
    low = {k: v[0] for k, v in ends.items()}
    jobs: list[list[str]] = []
    for key, values in ends.items():
        for v in values:
            job = fixed + [f"{k}={v if k == key else low[k]}" for k in ends]
            if job not in jobs:
                jobs.append(job)
    return jobs or [fixed]


def _ends(o: Override) -> list[str]:
    if o.is_interval_sweep():
        value = o.value()
        return [str(value.start), str(value.end)]
    values = list(o.sweep_string_iterator())
    return values if o.is_choice_sweep() else [values[0], values[-1]]
