"""Every configured sampler drives the cached loop; stochastic ones stay per-sample seeded."""

from __future__ import annotations

import pytest
import torch

from bench.sampling import loop as sampling
from bench.caching.engine import CacheSettings, deepcache
from harness import compose_cfg
from tiny import tiny_unet2d

SCHEDULER_CONFIG = {  # DDPM betas, as the DDPM models ship them
    "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
}


def loop(unet, scfg, indices, settings=None):
    scheduler = sampling.build_scheduler(scfg, SCHEDULER_CONFIG)
    gens = sampling.sample_generators(7, indices)
    noise = sampling.initial_noise(gens, (3, 16, 16), "cpu", torch.float32)
    calls = sampling.num_model_calls(scheduler)
    with torch.no_grad(), deepcache(unet, settings or CacheSettings(schedule="none"), num_calls=calls) as st:
        x = sampling.denoise(unet, scheduler, noise, generators=gens, eta=scfg.eta)
    return x, st, calls


@pytest.mark.parametrize("name,steps,calls", [("ddim", 6, 6), ("ddpm", 6, 6), ("plms", 6, 7), ("dpmsolver", 6, 6)])
def test_sampler_runs_cached_and_counts_model_calls(name, steps, calls):
    scfg = compose_cfg(f"sampler={name}", f"sampler.steps={steps}", "sampler.eta=0.5").sampler
    unet = tiny_unet2d()
    plain, _, n = loop(unet, scfg, range(2))
    assert n == calls
    same, st, _ = loop(unet, scfg, range(2), CacheSettings(interval=1, branch=2))
    assert torch.equal(same, plain)  # N = 1 is the plain loop, bit for bit
    cached, st, _ = loop(unet, scfg, range(2), CacheSettings(interval=3, branch=2))
    assert st.full_calls == list(range(0, calls, 3))
    assert st.retrieval_calls == calls - len(st.full_calls)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_stochastic_samplers_are_seeded_per_sample(name):
    """Noise added during sampling depends on the sample index, not on its batch."""
    scfg = compose_cfg(f"sampler={name}", "sampler.steps=5", "sampler.eta=1.0").sampler
    unet = tiny_unet2d()
    together, _, _ = loop(unet, scfg, range(3))
    alone, _, _ = loop(unet, scfg, [2])
    assert torch.allclose(together[2:], alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1])
