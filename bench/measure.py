"""Cost of a cached sampling run: MACs per call (two conventions) and throughput.

MACs (FACTS.md section 3): counted once per kind of call -- one full call, one
retrieval call at the configured branch -- on a meta-device copy of the U-Net (no
weights, no compute), per image, without doubling for classifier-free guidance,
then averaged over the run's schedule of full calls.

Throughput, two methods (``run.timing``):

* ``loop``: whole denoising loops (U-Net + scheduler; no VAE, text encoder or
  image I/O), baseline and cached interleaved in one process, warm-up excluded,
  median of ``run.timing_repeats``. This is the paper's measurement.
* ``calls``: one full call, one retrieval call and one scheduler-only loop are
  timed, interleaved; a loop's time is composed from the schedule,
  ``n_full * t_full + n_retrieval * t_retrieval + t_scheduler``. Much cheaper for
  sweeps (e.g. supplementary Table 13's twelve branches); the README compares it
  with ``loop`` on the same setting.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from bench import cost, sampling
from bench.engine import CacheSettings, deepcache
from bench.models import LoadedModel, random_context

TIMING_METHODS = ("loop", "calls", "off")


def call_macs(loaded: LoadedModel, mcfg: Any, settings: CacheSettings) -> tuple[cost.MacCount, cost.MacCount]:
    """MACs of one full and one retrieval call for one image (batch 1, no CFG doubling)."""
    unet = loaded.unet
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    x = torch.empty(1, *loaded.sample_shape, device="meta")
    t = torch.tensor([500], device="meta")
    kwargs = {k: v.to("meta") for k, v in random_context(mcfg, meta, 1, seed=0).items()}
    probe = CacheSettings(interval=2, branch=settings.branch)
    with deepcache(meta, probe) as state:
        full = cost.count_macs(meta, x, t, **kwargs)
        retrieval = cost.count_macs(meta, x, t, **kwargs)
    assert state.full_calls == [0] and state.retrieval_calls == 1
    return full, retrieval


def macs_record(
    loaded: LoadedModel, mcfg: Any, settings: CacheSettings, full_calls: list[int], num_calls: int
) -> dict[str, float]:
    full, retrieval = call_macs(loaded, mcfg, settings)
    avg = cost.average_macs(full, retrieval, full_calls, num_calls)
    return {
        "macs_paper": float(avg.paper),
        "macs_all": float(avg.all),
        "macs_full_paper": float(full.paper),
        "macs_full_all": float(full.all),
        "macs_retrieval_paper": float(retrieval.paper),
        "macs_retrieval_all": float(retrieval.all),
        "macs_predicted_speedup": float(full.paper / avg.paper),
        "macs_convention": "per image, per model call, averaged over the run; no CFG doubling; "
        "paper = conv + linear, all = + attention matmuls",
    }


def _inputs(loaded: LoadedModel, cfg: Any, batch: int):
    unet = loaded.unet
    p = next(unet.parameters())
    gens = sampling.sample_generators(cfg.run.seed, range(batch))
    noise = sampling.initial_noise(gens, loaded.sample_shape, p.device, p.dtype)
    cond = random_context(cfg.model, unet, batch, seed=cfg.run.seed)
    uncond = None
    if cond and cfg.model.guidance_scale > 1:
        uncond = random_context(cfg.model, unet, batch, seed=cfg.run.seed + 1)
    return gens, noise, cond, uncond


def loop_fn(loaded: LoadedModel, cfg: Any, settings: CacheSettings, batch: int) -> Callable[[], torch.Tensor]:
    """One whole denoising loop of ``batch`` samples; inputs prepared outside."""
    unet = loaded.unet
    gens, noise, cond, uncond = _inputs(loaded, cfg, batch)

    def run() -> torch.Tensor:
        scheduler = sampling.build_scheduler(cfg.sampler, loaded.scheduler_config)
        calls = sampling.num_model_calls(scheduler)
        with torch.inference_mode(), deepcache(unet, settings, num_calls=calls):
            return sampling.denoise(
                unet, scheduler, noise, cond=cond, uncond=uncond, guidance_scale=cfg.model.guidance_scale,
                generators=gens, eta=cfg.sampler.eta,
            )

    return run


def timing_record(
    loaded: LoadedModel, cfg: Any, settings: CacheSettings, full_calls: list[int], num_calls: int
) -> dict[str, Any]:
    method = getattr(cfg.run.timing, "value", cfg.run.timing)
    batch = cfg.run.timing_batch_size
    common = dict(
        images_per_call=batch, warmup=cfg.run.timing_warmup, repeats=cfg.run.timing_repeats,
        device=cfg.run.device, dtype=cfg.run.dtype,
    )
    if method == "loop":
        baseline = CacheSettings(interval=1, branch=settings.branch, schedule="none")
        res = cost.measure_throughput(
            {"baseline": loop_fn(loaded, cfg, baseline, batch), "cached": loop_fn(loaded, cfg, settings, batch)},
            **common,
        )
        t_base, t_cached = res["baseline"].median_time_s, res["cached"].median_time_s
    elif method == "calls":
        probe = CacheSettings(interval=2, branch=settings.branch)
        with torch.inference_mode(), deepcache(loaded.unet, probe) as state:
            res = cost.measure_throughput(_call_variants(loaded, cfg, state, batch), **common)
        t_full, t_retr, t_sched = (res[k].median_time_s for k in ("full_call", "retrieval_call", "scheduler"))
        n_full = len(full_calls)
        t_base = num_calls * t_full + t_sched
        t_cached = n_full * t_full + (num_calls - n_full) * t_retr + t_sched
    else:
        raise ValueError(f"run.timing={method!r} is not one of {', '.join(TIMING_METHODS)}")
    return {
        "throughput": batch / t_cached,
        "throughput_baseline": batch / t_base,
        "speedup": t_base / t_cached,
        "timing_method": method,
        "timing_batch_size": batch,
        "timing_repeats": cfg.run.timing_repeats,
        "timing_warmup": cfg.run.timing_warmup,
        "timing_threads": torch.get_num_threads(),
        "timing_raw_s": {k: [round(x, 6) for x in v.times_s] for k, v in res.items()},
    }


def _call_variants(loaded: LoadedModel, cfg: Any, state: Any, batch: int) -> dict[str, Callable]:
    """Callables timing one full call, one retrieval call (engine attached, uniform
    1:2 plan) and one scheduler-only loop."""
    unet = loaded.unet
    gens, noise, cond, uncond = _inputs(loaded, cfg, batch)
    kwargs, x = cond, noise
    if uncond is not None:
        kwargs = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        x = torch.cat([noise, noise])
    t = torch.tensor(500, device=noise.device)

    def full_call():
        state.reset()  # call 0: full
        unet(x, t, **kwargs)

    def retrieval_call():
        if state.calls != 1:
            raise RuntimeError("timing: a retrieval call must follow a full call")
        unet(x, t, **kwargs)  # call 1: retrieval

    def scheduler_only():
        scheduler = sampling.build_scheduler(cfg.sampler, loaded.scheduler_config)
        zero = _Zero(torch.zeros_like(noise))
        sampling.denoise(lambda *a, **k: zero, scheduler, noise, generators=gens, eta=cfg.sampler.eta)

    return {"full_call": full_call, "retrieval_call": retrieval_call, "scheduler": scheduler_only}


class _Zero:
    """A model output of zeros, for timing the scheduler alone."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample
