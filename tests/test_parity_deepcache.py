"""Parity with the authors' diffusers plug-in (``DeepCache`` 0.1.1 on PyPI).

Their ``cache_branch_id`` is our paper branch minus one (docs/conventions.md §1). With
DDIM (distinct timesteps, so their timestep lookup counts calls correctly), the same
pipeline, seed and interval must give the same images.
"""

from __future__ import annotations

import pytest
import torch

from bench.caching.engine import CacheSettings, deepcache
from tiny import tiny_sd_pipeline

DeepCache = pytest.importorskip("DeepCache")

STEPS, INTERVAL = 10, 3
PROMPTS = ["a photo of a cat", "a red bicycle"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def generate(pipe):
    g = torch.Generator().manual_seed(1234)
    return pipe(
        PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, generator=g,
        height=32, width=32, output_type="np",
    ).images


@pytest.mark.parametrize("branch", [1, 2, 3])
def test_same_images_as_the_authors_plugin(pipe, branch):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=branch - 1)
    helper.enable()
    try:
        theirs = generate(pipe)
    finally:
        helper.disable()
    with deepcache(pipe.unet, CacheSettings(interval=INTERVAL, branch=branch), num_calls=STEPS) as state:
        ours = generate(pipe)
    assert state.full_calls == [0, 3, 6, 9]
    plain = generate(pipe)
    assert not (abs(ours - plain) < 1e-5).all()  # caching did change the images
    assert ours.shape == theirs.shape
    assert abs(ours - theirs).max() < 1e-5
