"""Run orchestration: config -> model + sampler + cache -> measurements -> ``run.json``.

``run(cfg, out_dir)`` is what ``run.py`` hands over to. Each ``run.mode`` is one
small function in ``MODES``; metrics are reached only through ``metrics``' public
functions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from bench import measure, models, sampling
from bench.config import HarnessError
from bench.engine import CacheError, CacheSettings, DeepCache, deepcache
from bench.records import environment, write_record


def settings_record(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise HarnessError(f"run.dtype={name!r} is not a torch dtype (float32, float16, bfloat16)")
    return dtype


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _setup(cfg: Any) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"run.device={cfg.run.device!r} but CUDA is not available (use cpu)")


def run_cost(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """Schedule, wall time (and cost metrics) of the cached sampling loop; no metrics."""
    loaded = models.load_model(cfg.model, cfg.run.device, _dtype(cfg.run.dtype))
    settings = models.cache_settings(cfg.cache, cfg.model)
    scheduler = sampling.build_scheduler(cfg.sampler, loaded.scheduler_config)
    num_calls = sampling.num_model_calls(scheduler)
    try:  # validates branch and schedule against this model and this sampler
        plan = DeepCache(loaded.unet, settings, num_calls)
    except CacheError as e:
        raise HarnessError(str(e)) from None
    planned, skip = plan.state.plan, plan.skip
    record = {
        "mode": "cost",
        "settings": settings_record(cfg),
        "cache": {**settings.__dict__, "skip_producer": skip.producer, "skip_consumer": skip.consumer},
        "model_source": loaded.source,
        "num_model_calls": num_calls,
        "full_calls": planned,
        "num_full_calls": len(planned),
        **measure.macs_record(loaded, cfg.model, settings, planned, num_calls),
    }
    t0 = time.perf_counter()
    if _value(cfg.run.timing) != "off":
        record.update(measure.timing_record(loaded, cfg, settings, planned, num_calls))
    record["wall_time_s"] = time.perf_counter() - t0
    record["environment"] = environment(cfg.run.device)
    return record


MODES: dict[str, Callable[[Any, Path], dict[str, Any]]] = {"cost": run_cost}


def run(cfg: Any, out_dir: str | Path) -> Path:
    """Execute one run described by ``cfg``; returns the path of its ``run.json``."""
    _setup(cfg)
    mode = _value(cfg.run.mode)
    if mode not in MODES:
        raise HarnessError(f"run.mode={mode!r} is not available; valid: {', '.join(MODES)}")
    record = MODES[mode](cfg, Path(out_dir))
    path = write_record(out_dir, record)
    print(f"run record: {path}")
    return path
