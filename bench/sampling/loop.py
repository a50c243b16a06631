"""The denoising loop: a diffusers scheduler driving a (possibly cached) U-Net.

One loop for every sampler; the scheduler class and its options come from
``conf/sampler/*.yaml``. Randomness is per sample: sample ``i``'s initial noise and
any noise a stochastic sampler adds depend only on ``(seed, i)``, never on the batch
it happens to be generated in, so results do not depend on batch size or sharding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hydra.utils import get_class
from torch import nn

from bench.core.errors import HarnessError
from bench.core.seeds import sample_seed  # noqa: F401  (sample i's seed; re-exported)


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler (``conf/sampler/*.yaml``): a diffusers scheduler class, its options and steps."""

    name: str
    scheduler_class: str
    steps: int
    eta: float = 0.0
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)


def build_scheduler(spec: SamplerSpec, scheduler_config: dict[str, Any]):
    """A diffusers scheduler for ``spec`` with the model's betas, timesteps set."""
    if spec.steps < 1:
        raise HarnessError(f"sampler.steps must be >= 1, got {spec.steps}")
    cls = get_class(spec.scheduler_class)
    scheduler = cls.from_config(scheduler_config, **dict(spec.scheduler_kwargs))
    scheduler.set_timesteps(spec.steps)
    return scheduler


def num_model_calls(scheduler) -> int:
    """Model calls of one sampling run (PLMS makes 51 calls for 50 steps)."""
    return len(scheduler.timesteps)


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def initial_noise(
    generators: list[torch.Generator], shape: tuple[int, ...], device: str | torch.device, dtype
) -> torch.Tensor:
    """Initial latents, one generator per sample (drawn on CPU, so devices agree)."""
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise.to(device=device, dtype=dtype)


def denoise(
    unet: nn.Module,
    scheduler,
    latents: torch.Tensor,
    *,
    cond: dict[str, torch.Tensor] | None = None,
    uncond: dict[str, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    generators: list[torch.Generator] | None = None,
    eta: float = 0.0,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the sampling loop; returns the final sample (model space).

    With ``uncond`` given, classifier-free guidance batches the unconditional and
    conditional halves into one U-Net call (DeepCache caches that call as a whole).
    """
    cond = cond or {}
    kwargs = cond
    if uncond is not None:
        kwargs = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "eta" in step_params:
        step_kwargs["eta"] = eta
    if "generator" in step_params and generators is not None:
        step_kwargs["generator"] = generators
    x = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, t)
        if uncond is not None:
            eps_u, eps_c = unet(torch.cat([inp, inp]), t, **kwargs).sample.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = unet(inp, t, **kwargs).sample
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        if callback is not None:
            callback(i)
    return x
