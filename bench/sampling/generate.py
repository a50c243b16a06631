"""Generating images into the store: per-sample seeds, batches, resume."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.caching.engine import CacheSettings, deepcache
from bench.core.options import Ablation, DType, Schedule
from bench.models.loading import LoadedModel, ModelSpec
from bench.sampling import loop as sampling
from bench.sampling.loop import SamplerSpec
from bench.sampling.store import ImageStore, missing_runs


@dataclass(frozen=True)
class GenerationSpec:
    """How a run's images are generated: base seed, batch size, precision and device."""

    seed: int = 0
    batch_size: int = 64
    dtype: str = DType.float32.value
    device: str = "cpu"
    progress: bool = True


def store_key(
    loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, settings: CacheSettings, full_calls: list[int],
    gen: GenerationSpec, pipe: Any,
) -> dict[str, Any]:
    """What changes the images: weights, sampler, cache settings, seed, dtype, prompts."""
    cache: dict[str, Any] = {"schedule": Schedule.none.value}
    if settings.enabled:
        cache = {"branch": settings.branch, "full_calls": list(full_calls)}
        if settings.ablation != Ablation.none:  # only then: the keys of existing stores stay as they were
            cache["ablation"] = settings.ablation
    return {
        "model": model.name,
        "weights": loaded.fingerprint,
        "sampler": {
            "class": sampler.scheduler_class, "steps": sampler.steps, "eta": sampler.eta,
            "kwargs": dict(sampler.scheduler_kwargs), "scheduler_config": loaded.scheduler_config,
        },
        "guidance_scale": model.guidance_scale,
        "cache": cache,
        "seed": gen.seed,
        "dtype": gen.dtype,
        "device_type": torch.device(gen.device).type,
        **pipe.key(),
    }


def generate(
    loaded: LoadedModel,
    sampler: SamplerSpec,
    settings: CacheSettings,
    store: ImageStore,
    indices: range,
    pipe: Any,
    gen: GenerationSpec,
    *,
    desc: str = "generate",
) -> dict[str, Any]:
    """Generate every sample of ``indices`` not yet in ``store``, batch by batch.

    ``pipe`` conditions the samples and decodes them (``bench.models.pipelines``); only the
    denoising loop runs with the cache attached."""
    unet = loaded.unet
    p = next(unet.parameters())
    missing = store.missing(indices)
    generated, t0 = 0, time.perf_counter()
    full_calls: list[int] | None = None
    bar = tqdm(total=len(indices), initial=len(indices) - len(missing), desc=desc, unit="img",
               disable=not gen.progress, leave=False)
    for chunk in missing_runs(missing, gen.batch_size):
        scheduler = sampling.build_scheduler(sampler, loaded.scheduler_config)
        gens = sampling.sample_generators(gen.seed, chunk)
        noise = sampling.initial_noise(gens, loaded.sample_shape, p.device, p.dtype)
        cond, uncond = pipe.conditioning(chunk)
        with torch.inference_mode(), deepcache(unet, settings, num_calls=sampling.num_model_calls(scheduler)) as st:
            x = sampling.denoise(
                unet, scheduler, noise, cond=cond, uncond=uncond, guidance_scale=pipe.guidance_scale,
                generators=gens, eta=sampler.eta,
            )
        full_calls = list(st.full_calls)
        store.write(chunk.start, pipe.decode(x))
        generated += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return {
        "generated": generated,
        "reused": len(indices) - len(missing),
        "generation_time_s": time.perf_counter() - t0 if generated else None,
        "executed_full_calls": full_calls,
    }
