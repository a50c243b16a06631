"""A text-conditioned latent model through the runner: prompts, guidance, VAE, CLIP score.

A tiny random Stable Diffusion pipeline is saved in the diffusers layout (unet,
vae, text_encoder, tokenizer, scheduler) and run as `model=sd15
model.pretrained=<dir>`; its images must equal those of diffusers' own
StableDiffusionPipeline given the same initial latents, with and without caching.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.sampling import loop as sampling
from bench.caching.engine import CacheSettings, deepcache
from bench.run.runner import run
from bench.sampling.store import ImageStore
from harness import compose_cfg
from tiny import tiny_sd_pipeline

PROMPTS = ["a red bicycle", "a photo of a cat", "two dogs on a beach", "a bowl of soup"]
STEPS, N = 6, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from metrics.clip_score import ClipScorer

    root = tmp_path_factory.mktemp("t2i")
    pipe = tiny_sd_pipeline(root / "build")
    pipe.save_pretrained(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    torch.save(ClipScorer("ViT-S-32", pretrained=None, device="cpu").model.state_dict(), root / "clip.pt")
    cfg = compose_cfg(
        "model=sd15", f"model.pretrained={root}/sd", "sampler=ddim", f"sampler.steps={STEPS}",
        f"cache.interval={N}", "cache.branch=2", "run.num_samples=4", "run.batch_size=2",
        f"run.prompts.source={root}/prompts.txt", "metrics.clip_model=ViT-S-32", "metrics.clip_pretrained=null",
        f"metrics.clip_checkpoint={root}/clip.pt", "run.timing=off", "run.progress=false",
        f"run.store_dir={root}/store",
    )
    rec = json.loads(run(cfg, root / "out").read_text())
    return pipe, rec


def _store_images(path: str) -> np.ndarray:
    return ImageStore.existing(path).load(range(4))


def _diffusers_images(pipe, cached: bool) -> np.ndarray:
    """diffusers' own pipeline, fed the harness's per-sample initial latents."""
    gens = sampling.sample_generators(0, range(4))
    latents = sampling.initial_noise(gens, (4, 16, 16), "cpu", torch.float32)

    def call():
        out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
                   height=32, width=32, output_type="np").images
        return np.round(out * 255).astype(np.uint8)

    if not cached:
        return call()
    with deepcache(pipe.unet, CacheSettings(interval=N, branch=2), num_calls=STEPS):
        return call()


def test_images_match_diffusers_pipeline(setup):
    pipe, rec = setup
    ours_base = _store_images(rec["baseline"]["store"])
    ours_cached = _store_images(rec["store"])
    assert ours_base.shape == (4, 32, 32, 3) and ours_base.dtype == np.uint8
    for ours, cached in ((ours_base, False), (ours_cached, True)):
        theirs = _diffusers_images(pipe, cached)
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert not np.array_equal(ours_base, ours_cached)


def test_record_carries_clip_score_and_protocol(setup):
    _, rec = setup
    m = rec["measurements"]
    assert m["protocol"] == "open_clip/ViT-S-32/random-init"
    assert m["clip_model"] == "ViT-S-32" and m["clip_scale"] == 100.0 and m["clip_clamp"] == 0.0
    for r in (m, rec["baseline"]["measurements"]):
        assert 0.0 <= r["clip_score"] <= 100.0 and r["clip_n"] == 4
    assert rec["full_calls"] == [0, 3] and rec["cache"]["branch"] == 2


def test_text_model_needs_prompts(tmp_path, setup):
    from bench.core.errors import HarnessError

    sd = setup[1]["settings"]["model"]["pretrained"]
    common = ["model=sd15", f"model.pretrained={sd}", "run.mode=generate", "sampler=ddim", "sampler.steps=2",
              f"run.store_dir={tmp_path}/store"]
    with pytest.raises(HarnessError, match="text-conditioned: set run.prompts.source"):
        run(compose_cfg(*common, "run.num_samples=2"), tmp_path / "out")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n")
    with pytest.raises(HarnessError, match="run.num_samples=2 exceeds the 1 prompts"):
        run(compose_cfg(*common, "run.num_samples=2", f"run.prompts.source={prompts}"), tmp_path / "out")
    assert not list(tmp_path.glob("**/samples_*.npz"))


def test_prompts_from_a_local_dataset_take_the_first_caption(tmp_path):
    """A hub-style dataset directory (as phiyodr/coco2017: a list of captions per image)."""
    import pandas as pd

    from bench.models.pipelines import load_prompts

    (tmp_path / "coco" / "data").mkdir(parents=True)
    pd.DataFrame({"captions": [["a cat", "a small cat"], ["a dog", "the dog"]], "id": [1, 2]}).to_parquet(
        tmp_path / "coco" / "data" / "validation-00000-of-00001.parquet"
    )
    assert load_prompts(str(tmp_path / "coco"), column="captions", split="validation") == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps(["x", "y"]))
    assert load_prompts(str(tmp_path / "p.json")) == ["x", "y"]
