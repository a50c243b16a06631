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

from bench import models, sampling
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


def _setup(cfg: Any) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"run.device={cfg.run.device!r} but CUDA is not available (use cpu)")


def cached_loop(
    loaded: models.LoadedModel, cfg: Any, settings: CacheSettings, batch: int, start: int = 0
) -> Callable[[], tuple[torch.Tensor, list[int]]]:
    """A closure running one whole sampling loop of ``batch`` samples under ``settings``.

    Only the denoising loop (U-Net + scheduler) runs inside; contexts and noise are
    prepared outside, so timing it measures what the paper's speed-ups measure.
    """
    unet = loaded.unet
    p = next(unet.parameters())
    gens_seed, idx = cfg.run.seed, range(start, start + batch)
    cond = models.random_context(cfg.model, unet, batch, seed=cfg.run.seed)
    uncond = None
    if cond and cfg.model.guidance_scale > 1:
        uncond = models.random_context(cfg.model, unet, batch, seed=cfg.run.seed + 1)

    def loop() -> tuple[torch.Tensor, list[int]]:
        scheduler = sampling.build_scheduler(cfg.sampler, loaded.scheduler_config)
        gens = sampling.sample_generators(gens_seed, idx)
        noise = sampling.initial_noise(gens, loaded.sample_shape, p.device, p.dtype)
        num_calls = sampling.num_model_calls(scheduler)
        with torch.inference_mode(), deepcache(unet, settings, num_calls=num_calls) as state:
            x = sampling.denoise(
                unet, scheduler, noise, cond=cond, uncond=uncond,
                guidance_scale=cfg.model.guidance_scale, generators=gens, eta=cfg.sampler.eta,
            )
        return x, list(state.full_calls)

    return loop


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
    loop = cached_loop(loaded, cfg, settings, cfg.run.timing_batch_size)
    t0 = time.perf_counter()
    _, executed = loop()
    wall = time.perf_counter() - t0
    assert executed == planned, (executed, planned)
    return {
        "mode": "cost",
        "settings": settings_record(cfg),
        "cache": {**settings.__dict__, "skip_producer": skip.producer, "skip_consumer": skip.consumer},
        "model_source": loaded.source,
        "num_model_calls": num_calls,
        "full_calls": planned,
        "num_full_calls": len(planned),
        "wall_time_s": wall,
        "wall_time_batch_size": cfg.run.timing_batch_size,
        "environment": environment(cfg.run.device),
    }


MODES: dict[str, Callable[[Any, Path], dict[str, Any]]] = {"cost": run_cost}


def run(cfg: Any, out_dir: str | Path) -> Path:
    """Execute one run described by ``cfg``; returns the path of its ``run.json``."""
    _setup(cfg)
    mode = getattr(cfg.run.mode, "value", cfg.run.mode)
    if mode not in MODES:
        raise HarnessError(f"run.mode={mode!r} is not available; valid: {', '.join(MODES)}")
    record = MODES[mode](cfg, Path(out_dir))
    path = write_record(out_dir, record)
    print(f"run record: {path}")
    return path
