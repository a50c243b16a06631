"""The zeros ablation of main paper Table 5 (``cache.ablation=zeros``): a retrieval call gets
zeros of the stored feature's shape in its place; everything else is DeepCache as published,
and the store keys of ordinary runs do not change."""

from __future__ import annotations

import pytest
import torch

from bench.caching.engine import CacheError, CacheSettings, deepcache, skip_table
from tiny import tiny_unet2d, tiny_unet2d_cond

T = torch.tensor(537)
UNETS = {"unet2d": tiny_unet2d, "unet2d_cond": tiny_unet2d_cond}


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    kw = {}
    if getattr(c, "cross_attention_dim", None):
        kw["encoder_hidden_states"] = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    return x, kw


def _zeroed_main_path(unet, skip, x, kw):
    """The whole U-Net with the main-path input of the skip's consumer zeroed: what a
    retrieval call with a zero feature must compute (the deeper layers run but are unused)."""

    def zero(module, args, kwargs):
        h = (args[0] if args else kwargs["input_tensor"]).clone()
        h[:, : skip.main_channels] = 0
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "input_tensor": h}

    handle = unet.get_submodule(skip.consumer).register_forward_pre_hook(zero, with_kwargs=True)
    try:
        return unet(x, T, **kw).sample
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", UNETS)
def test_a_zeros_retrieval_equals_the_unet_with_the_cached_input_zeroed(kind):
    unet = UNETS[kind]()
    x, kw = _inputs(unet)
    y, _ = _inputs(unet, seed=1)
    with torch.no_grad():
        ref = unet(x, T, **kw).sample
        for s in skip_table(unet):
            want = _zeroed_main_path(unet, s, y, kw)
            with deepcache(unet, CacheSettings(interval=3, branch=s.branch, ablation="zeros")) as state:
                full = unet(x, T, **kw).sample
                retr = unet(y, T, **kw).sample
            assert state.full_calls == [0] and state.retrieval_calls == 1
            assert torch.equal(full, ref), s.branch  # full calls are untouched
            assert torch.allclose(retr, want, atol=1e-6, rtol=0), s.branch
            # and it is an ablation: the ordinary retrieval differs
            with deepcache(unet, CacheSettings(interval=3, branch=s.branch)):
                unet(x, T, **kw)
                assert not torch.allclose(unet(y, T, **kw).sample, retr), s.branch


def test_an_unknown_ablation_is_a_clear_error():
    with pytest.raises(CacheError, match=r"cache.ablation='ones' is not one of none, zeros"):
        CacheSettings(interval=2, ablation="ones")


def test_the_ablation_is_in_the_store_key_only_when_set():
    """Existing stores (and the golden gate's) keep their keys; an ablated run gets its own."""
    from types import SimpleNamespace

    from bench.caching.method import Caching, Plan
    from bench.sampling.generate import GenerationSpec, store_key
    from bench.sampling.loop import SamplerSpec
    from bench.models.loading import ModelSpec

    loaded = SimpleNamespace(fingerprint="w", scheduler_config={})
    model = ModelSpec(name="m", unet_class="x", arch="a", pretrained=None, subfolder=None, scheduler_subfolder=None,
                      weights="random", init_seed=0, conditioning="none", context_tokens=0, guidance_scale=1.0,
                      output="pixels", pipeline=None)
    sampler = SamplerSpec(name="ddim", scheduler_class="diffusers.DDIMScheduler", steps=10, eta=0.0,
                          scheduler_kwargs={})
    pipe = SimpleNamespace(key=lambda: {})

    def key(**kw):
        settings = CacheSettings(interval=5, **kw)
        caching = Caching(settings, Plan(tuple("full" if i in (0, 5) else "retrieval" for i in range(10))))
        return store_key(loaded, model, sampler, caching, GenerationSpec(), pipe)

    assert key()["cache"] == {"branch": 1, "full_calls": [0, 5]}
    assert key(ablation="none") == key()
    assert key(ablation="zeros")["cache"] == {"branch": 1, "full_calls": [0, 5], "ablation": "zeros"}


def test_the_setting_reaches_the_engine_from_the_config():
    from harness import compose_cfg

    from bench.run.parts import cache_settings

    cfg = compose_cfg("cache.ablation=zeros", "cache.interval=10")
    assert cache_settings(cfg.cache, cfg.model).ablation == "zeros"
    assert cache_settings(compose_cfg().cache, compose_cfg().model).ablation == "none"
