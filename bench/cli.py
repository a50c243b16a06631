"""The command line: ``deepcache-bench`` (installed) and ``python run.py`` (a checkout).

    deepcache-bench                                   # embedded default, full job
    deepcache-bench -m cache.interval=2,3,5,10,20 cache.schedule=nonuniform
    deepcache-bench -m experiment=table13

Hydra composes the config from ``conf/`` (shipped inside the package as
``bench.conf``) and hands it to :func:`bench.run.runner.run`. A bad setting is one line
on stderr and exit status 2 -- Hydra's own composition errors too (an unknown config
group value, an override that does not parse); in a sweep, every point is checked before the first job
starts, and a job that fails anyway is recorded and the others still run (exit 1).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import HarnessError
from bench.core.options import Mode, value
from bench.core.resources import PACKAGE_DIR
from bench.run import config as schemas


def register() -> None:
    """Register the schemas (:mod:`bench.run.config`), the harness's sweepers and the
    ``${pkg:...}`` (package-relative paths) and ``${launch_time:...}`` resolvers."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=schemas.Config)
    cs.store(group="schemas", name="cache", node=schemas.CacheConfig)
    cs.store(group="schemas", name="model", node=schemas.ModelConfig)
    cs.store(group="schemas", name="sampler", node=schemas.SamplerConfig)
    cs.store(group="schemas", name="metrics", node=schemas.MetricsConfig)
    from hydra.core.plugins import Plugins

    from hydra_plugins.deepcache_bench.search_sweeper import (
        SearchSweeper,  # hydra/sweeper=search
    )
    from hydra_plugins.deepcache_bench.table_sweeper import (
        TableSweeper,  # also stores hydra/sweeper=table
    )

    Plugins.instance().register(TableSweeper)  # whether or not Hydra's plugin scan finds it
    Plugins.instance().register(SearchSweeper)

    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_new_resolver("pkg", lambda rel: str(PACKAGE_DIR / rel))
    if not OmegaConf.has_resolver("launch_time"):
        # like Hydra's ${now:...}, but the same in every process of a torchrun launch
        # (bench.run.distributed.launch_time); cached per config as ${now:} is
        OmegaConf.register_new_resolver("launch_time", _launch_time, use_cache=True)


def _launch_time(pattern: str) -> str:
    from bench.run.distributed import launch_time

    return launch_time().strftime(pattern)


register()


def _config_path() -> str:
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():  # bench imported from a checkout: its own configs
        return str(checkout)
    return "pkg://bench.conf"  # installed from a wheel


def writable_output(argv: list[str]) -> str | None:
    """Refuse an output directory that cannot be created, before Hydra tries to."""
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for d in dirs or ["."]:
        p = Path(d).absolute()
        while not p.exists():
            p = p.parent
        if not p.is_dir() or not os.access(p, os.W_OK):
            return f"error: output directory {d!r} cannot be created ({p} is not a writable directory)"
    return None


# config choices that need an optional extra: (override, Hydra plugin module, extra)
PLUGIN_CHOICES = [
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher=local", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/sweeper=search", "hydra_plugins.hydra_optuna_sweeper", "search"),
]


def missing_plugin(argv: list[str]) -> str | None:
    """A launcher or sweeper chosen on the command line whose Hydra plugin is not installed."""
    import importlib.util

    for choice, module, extra in PLUGIN_CHOICES:
        if choice in argv and importlib.util.find_spec(module) is None:
            return (f"error: {choice} needs the {module.split('.')[-1].replace('_', '-')} plugin: "
                    f"pip install -e \".[{extra}]\" (or pip install \"deepcache-bench[{extra}]\")")
    return None


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def _task(cfg: DictConfig) -> float | None:
    from bench.run import search
    from bench.run.runner import run

    hc = HydraConfig.get()
    try:
        if hc.mode == RunMode.MULTIRUN and search.in_use(hc.sweeper):
            return search.objective(cfg, hc.runtime.output_dir, hc.sweeper)  # a trial of hydra/sweeper=search
        if value(cfg.run.mode) == Mode.plan:  # a sweep's plan is made by its sweeper, before any job
            from bench.run.plan import plan_run

            plan_run(cfg, hc.runtime.output_dir)
            return None
        run(cfg, hc.runtime.output_dir)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweeper records this job as failed and runs the others
        sys.exit(2)


class _Refused(BaseException):
    """A Hydra composition error, in one line: not an ``Exception``, so that it passes
    Hydra's own reporting (which prints several lines and exits 1) up to :func:`main`."""


def composition_error(e: BaseException) -> str:
    """Hydra's message for a config it could not compose (an unknown config group value, an
    override that does not parse or does not fit the schema) as one line: the message, the
    OmegaConf cause without its ``full_key``/``object_type`` details, and the valid values
    Hydra lists (``Available options in 'model': ...``) or, for an unknown key, the valid keys."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    def lines(x: BaseException) -> list[str]:
        return [ln.strip() for ln in str(x).splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]

    head = lines(e)
    if isinstance(e, MissingConfigException):
        group = next((ln for ln in head if ln.startswith("Available options in")), None)
        head = head[:1]
        if group and e.options:
            head.append(f"valid values {group.removeprefix('Available options ').rstrip(':')}: {', '.join(e.options)}")
    elif isinstance(e, OverrideParseException):
        head = [f"cannot parse the override {e.override!r}: {' '.join(lines(e)[:1])}",
                *(ln for ln in lines(e)[1:] if "hydra.cc" in ln)]
    cause = e.__cause__
    if cause is not None:
        head += lines(cause)
        full_key = str(getattr(cause, "full_key", None) or "")
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full_key:
            from bench.run.validate import schema_keys

            parent = full_key.rpartition(".")[0]
            node = getattr(cause, "parent_node", None)  # a group without a schema (a caching method): its keys
            valid = schema_keys(parent) or [str(k) for k in getattr(node, "keys", list)() if not str(k).startswith("_")]
            if valid:
                head.append(f"valid settings{' of ' + parent if parent else ''}: {', '.join(valid)}")
    return "; ".join(" ".join(ln.split()).rstrip(".") for ln in head) or type(e).__name__


@contextlib.contextmanager
def _compact_composition_errors():
    """While Hydra runs: a composition error leaves as :class:`_Refused` (one line, exit 2
    in :func:`main`) instead of Hydra's multi-line report and exit 1. Everything else --
    a job's own failure, ``--help``, ``--cfg job`` -- is Hydra's as before, and so is
    every error when ``HYDRA_FULL_ERROR=1`` asks for the stack trace."""
    try:
        import hydra._internal.utils as hydra_utils  # where Hydra reports errors (1.3)
    except ImportError:  # pragma: no cover -- another Hydra: its own reports
        yield
        return
    from hydra.errors import ConfigCompositionException, OverrideParseException, SearchPathException

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
        yield
        return

    def refusing(func: Any) -> Any:
        try:
            return func()
        except (ConfigCompositionException, OverrideParseException, SearchPathException) as e:
            raise _Refused(composition_error(e)) from None

    hydra_utils.run_and_report = lambda func: original(lambda: refusing(func))
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def main() -> None:
    from bench.run import distributed

    problem = writable_output(sys.argv[1:]) or missing_plugin(sys.argv[1:])
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    try:  # under torchrun: one output directory for all ranks, no Hydra files from ranks > 0
        sys.argv += distributed.prepare_launch(sys.argv[1:])
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        with _compact_composition_errors():
            _task()
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
