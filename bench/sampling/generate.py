"""Generating images into the store: per-sample seeds, batches, resume."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from bench.caching.method import Caching
from bench.core.options import DType
from bench.models.loading import LoadedModel, ModelSpec, random_context
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
    loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, caching: Caching, gen: GenerationSpec, pipe: Any,
) -> dict[str, Any]:
    """What changes the images: weights, sampler, the caching method's key
    (:meth:`bench.caching.method.CacheMethod.key`), seed, dtype, prompts."""
    return {
        "model": model.name,
        "weights": loaded.fingerprint,
        "sampler": {
            "class": sampler.scheduler_class, "steps": sampler.steps, "eta": sampler.eta,
            "kwargs": dict(sampler.scheduler_kwargs), "scheduler_config": loaded.scheduler_config,
        },
        "guidance_scale": model.guidance_scale,
        "cache": caching.key(),
        "seed": gen.seed,
        "dtype": gen.dtype,
        "device_type": torch.device(gen.device).type,
        **pipe.key(),
    }


def generate(
    loaded: LoadedModel,
    sampler: SamplerSpec,
    caching: Caching,
    store: ImageStore,
    indices: range,
    pipe: Any,
    gen: GenerationSpec,
    *,
    desc: str = "generate",
) -> dict[str, Any]:
    """Generate every sample of ``indices`` not yet in ``store``, batch by batch.

    ``pipe`` conditions the samples and decodes them (``bench.models.pipelines``); only the
    denoising loop runs with the caching method attached."""
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
        calls = sampling.num_model_calls(scheduler)
        if calls != caching.plan.num_calls:
            raise ValueError(f"the sampler makes {calls} model calls, the caching plan has {caching.plan.num_calls}")
        with torch.inference_mode(), caching.attach(unet) as st:
            x = sampling.denoise(
                unet, scheduler, noise, cond=cond, uncond=uncond, guidance_scale=pipe.guidance_scale,
                generators=gens, eta=sampler.eta,
            )
        full_calls = st.executed_full_calls
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


def random_inputs(loaded: LoadedModel, model: ModelSpec, seed: int, batch: int
                  ) -> tuple[list[torch.Generator], torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Generators, initial noise and random conditioning (the unconditional half too when the
    model is guided) of samples ``0..batch-1`` for ``seed``: inputs that need no prompts."""
    unet = loaded.unet
    p = next(unet.parameters())
    gens = sampling.sample_generators(seed, range(batch))
    noise = sampling.initial_noise(gens, loaded.sample_shape, p.device, p.dtype)
    cond = random_context(model.conditioning, model.context_tokens, unet, batch, seed=seed)
    uncond = None
    if cond and model.guidance_scale > 1:
        uncond = random_context(model.conditioning, model.context_tokens, unet, batch, seed=seed + 1)
    return gens, noise, cond, uncond


def calibration(loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, gen: GenerationSpec
                ) -> Callable[[int], None]:
    """``calibrate(samples)`` for a method that plans from the model's behaviour
    (:meth:`bench.caching.method.CacheMethod.plan`): one uncached sampling loop of the run's
    sampler over samples ``0..samples-1`` of the run's seed, with random conditioning (so a
    plan depends on the weights, the sampler and the seed only, never on the prompts, the
    batch size or the shard)."""

    def calibrate(samples: int) -> None:
        scheduler = sampling.build_scheduler(sampler, loaded.scheduler_config)
        gens, noise, cond, uncond = random_inputs(loaded, model, gen.seed, int(samples))
        with torch.inference_mode():
            sampling.denoise(loaded.unet, scheduler, noise, cond=cond, uncond=uncond,
                             guidance_scale=model.guidance_scale, generators=gens, eta=sampler.eta)

    return calibrate
