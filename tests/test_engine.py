"""Invariants of the DeepCache engine (paper Algorithm 1) on diffusers U-Nets."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch import nn

from bench.sampling import loop as sampling
from bench.caching.engine import CacheError, CacheSettings, DeepCache, deepcache, skip_table
from tiny import cifar10_unet, tiny_unet2d, tiny_unet2d_cond

T = torch.tensor(537)


def inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    kw = {}
    if getattr(c, "cross_attention_dim", None):
        kw["encoder_hidden_states"] = torch.randn(batch, 5, c.cross_attention_dim, generator=g)
    return x, kw


def ddim_loop(unet, steps=8, batch=2, uncond=False):
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x, kw = inputs(unet, batch)
    un = {k: torch.zeros_like(v) for k, v in kw.items()} if (uncond and kw) else None
    with torch.no_grad():
        return sampling.denoise(unet, sched, x, cond=kw, uncond=un, guidance_scale=3.0)


UNETS = {"unet2d": tiny_unet2d, "unet2d_cond": tiny_unet2d_cond}


# --- the skip table -----------------------------------------------------------------
CIFAR10_TABLE = [  # docs/conventions.md §1: paper branch -> (producer, consumer, stored channels)
    (1, "conv_in", "up_blocks.3.resnets.2", 128),
    (2, "down_blocks.0.resnets.0", "up_blocks.3.resnets.1", 128),
    (3, "down_blocks.0.resnets.1", "up_blocks.3.resnets.0", 256),
    (4, "down_blocks.0.downsamplers.0", "up_blocks.2.resnets.2", 256),
    (5, "down_blocks.1.resnets.0", "up_blocks.2.resnets.1", 256),
    (6, "down_blocks.1.resnets.1", "up_blocks.2.resnets.0", 256),
    (7, "down_blocks.1.downsamplers.0", "up_blocks.1.resnets.2", 256),
    (8, "down_blocks.2.resnets.0", "up_blocks.1.resnets.1", 256),
    (9, "down_blocks.2.resnets.1", "up_blocks.1.resnets.0", 256),
    (10, "down_blocks.2.downsamplers.0", "up_blocks.0.resnets.2", 256),
    (11, "down_blocks.3.resnets.0", "up_blocks.0.resnets.1", 256),
    (12, "down_blocks.3.resnets.1", "up_blocks.0.resnets.0", 256),
]


@pytest.fixture(scope="module")
def cifar():
    return cifar10_unet()


def test_cifar10_skip_table_row_by_row(cifar):
    table = skip_table(cifar)
    assert len(table) == 12
    got = [(s.branch, s.producer, s.consumer, s.main_channels) for s in table]
    assert got == CIFAR10_TABLE


def test_cifar10_stored_tensor_shapes(cifar):
    """The stored main-path tensor has the shape docs/conventions.md §1 lists (channels @ resolution)."""
    sizes = {1: 32, 2: 32, 3: 32, 4: 16, 5: 16, 6: 16, 7: 8, 8: 8, 9: 8, 10: 4, 11: 4, 12: 4}
    x, _ = inputs(cifar, batch=1)
    for s in skip_table(cifar):
        eng = DeepCache(cifar, CacheSettings(interval=2, branch=s.branch)).attach()
        try:
            with torch.no_grad():
                cifar(x, T)
            assert tuple(eng.state.stored.shape) == (1, s.main_channels, sizes[s.branch], sizes[s.branch])
        finally:
            eng.detach()


def test_branch_out_of_range_is_a_clear_error(cifar):
    with pytest.raises(CacheError, match=r"cache.branch=13 .*valid branches are 1\.\.12"):
        DeepCache(cifar, CacheSettings(interval=5, branch=13))


@pytest.mark.parametrize("bad", [dict(interval=0), dict(branch=0), dict(schedule="sometimes")])
def test_bad_settings(bad):
    with pytest.raises(CacheError):
        CacheSettings(**bad)


# --- exactness ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", UNETS)
@pytest.mark.parametrize("settings", [CacheSettings(interval=1, branch=3), CacheSettings(interval=4, schedule="none")])
def test_no_caching_is_bit_identical_over_a_loop(kind, settings):
    unet = UNETS[kind]()
    ref = ddim_loop(unet, uncond=True)
    with deepcache(unet, settings, num_calls=8) as state:
        out = ddim_loop(unet, uncond=True)
    assert torch.equal(out, ref)
    assert state.full_calls == list(range(8)) and state.retrieval_calls == 0


@pytest.mark.parametrize("kind", UNETS)
def test_full_and_retrieval_calls_are_exact_for_every_branch(kind):
    unet = UNETS[kind]()
    x, kw = inputs(unet)
    with torch.no_grad():
        ref = unet(x, T, **kw).sample
        for s in skip_table(unet):
            with deepcache(unet, CacheSettings(interval=3, branch=s.branch)) as state:
                full = unet(x, T, **kw).sample
                retr = unet(x, T, **kw).sample
            assert state.full_calls == [0] and state.retrieval_calls == 1
            assert torch.equal(full, ref), s.branch
            assert torch.equal(retr, full), s.branch


def test_every_cifar10_branch_runs_on_the_real_architecture(cifar):
    x, _ = inputs(cifar, batch=1)
    with torch.no_grad():
        ref = cifar(x, T).sample
        x2 = torch.randn_like(x)
        ref2 = cifar(x2, T - 20).sample
        for s in skip_table(cifar):
            with deepcache(cifar, CacheSettings(interval=2, branch=s.branch)):
                assert torch.equal(cifar(x, T).sample, ref)
                out = cifar(x2, T - 20).sample  # retrieval on a new input: approximates
            assert out.shape == ref2.shape and torch.isfinite(out).all()
            assert not torch.equal(out, ref2)  # the cached feature is really used


def _executed(unet, fn):
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.append(n)) for n, m in unet.named_modules()
    ]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _paired_attention(unet, path):
    """down_blocks.b.resnets.j -> down_blocks.b.attentions.j, if that block has attentions."""
    parts = path.split(".")
    if len(parts) == 4 and parts[2] == "resnets":
        block = unet.get_submodule(".".join(parts[:2]))
        if getattr(block, "attentions", None) is not None:
            return ".".join(parts[:2] + ["attentions", parts[3]])
    return None


@pytest.mark.parametrize("kind", UNETS)
def test_retrieval_runs_nothing_deeper_than_the_branch(kind):
    unet = UNETS[kind]()
    x, kw = inputs(unet)
    table = skip_table(unet)
    full_names = _executed(unet, lambda: unet(x, T, **kw))
    for s in table:
        with deepcache(unet, CacheSettings(interval=2, branch=s.branch)):
            assert _executed(unet, lambda: unet(x, T, **kw)) == full_names
            ran = set(_executed(unet, lambda: unet(x, T, **kw)))
        assert not any(n == "mid_block" or n.startswith("mid_block.") for n in ran)
        for other in table:
            layers = [other.producer, other.consumer]
            layers += [a for a in map(lambda p: _paired_attention(unet, p), layers) if a]
            for layer in layers:
                if other.index <= s.index:
                    assert layer in ran, (s.branch, layer)
                else:
                    assert layer not in ran and not any(n.startswith(layer + ".") for n in ran), (s.branch, layer)
        assert len(ran) < len(set(full_names))


# --- attach / detach, state -----------------------------------------------------------
@pytest.mark.parametrize("kind", UNETS)
def test_detach_restores_the_instance(kind):
    unet = UNETS[kind]()
    x, kw = inputs(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        ref = unet(x, T, **kw).sample
    hooks_before = {n: len(m._forward_pre_hooks) for n, m in unet.named_modules()}
    with deepcache(unet, CacheSettings(interval=3, branch=2)):
        assert "forward" in unet.__dict__
        ddim_loop(unet)
    assert "forward" not in unet.__dict__
    assert unet.forward.__func__ is type(unet).forward
    assert {n: len(m._forward_pre_hooks) for n, m in unet.named_modules()} == hooks_before
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(unet(x, T, **kw).sample, ref)


def test_detach_happens_even_when_the_loop_fails():
    unet = tiny_unet2d()
    with pytest.raises(RuntimeError, match="boom"):
        with deepcache(unet, CacheSettings(interval=3, branch=2)):
            raise RuntimeError("boom")
    assert "forward" not in unet.__dict__


def test_a_foreign_instance_forward_is_kept_and_restored():
    unet = tiny_unet2d()
    x, _ = inputs(unet)
    calls = []
    original = unet.forward

    def wrapper(*a, **k):
        calls.append(1)
        return original(*a, **k)

    unet.forward = wrapper
    with torch.no_grad(), deepcache(unet, CacheSettings(interval=2, branch=1)):
        unet(x, T)
        unet(x, T)
    assert unet.__dict__["forward"] is wrapper and calls == [1]  # full call went through it


def test_attaching_twice_is_refused():
    unet = tiny_unet2d()
    with deepcache(unet, CacheSettings(interval=3, branch=2)):
        with pytest.raises(CacheError, match="already attached"):
            DeepCache(unet, CacheSettings(interval=2, branch=1)).attach()


@pytest.mark.parametrize("kind", UNETS)
def test_same_seed_same_output_no_state_leak(kind):
    unet = UNETS[kind]()
    settings = CacheSettings(interval=3, branch=2)
    with deepcache(unet, settings, num_calls=8) as state:
        a = ddim_loop(unet, uncond=True)
        first = list(state.full_calls)
        b = ddim_loop(unet, uncond=True)  # the counter wraps: a fresh run
        assert state.full_calls == first == [0, 3, 6] and state.runs == 2
    with deepcache(unet, settings, num_calls=8):
        c = ddim_loop(unet, uncond=True)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_cfg_batch_is_cached_as_one_call():
    unet = tiny_unet2d_cond()
    with deepcache(unet, CacheSettings(interval=4, branch=1), num_calls=8) as state:
        ddim_loop(unet, steps=8, batch=3, uncond=True)
        assert state.calls == 8 and state.full_calls == [0, 4]
        assert state.stored is not None and state.stored.shape[0] == 6  # uncond + cond


def test_calls_are_counted_not_looked_up_by_timestep():
    """Repeated timestep values (as in PLMS) do not confuse the schedule."""
    unet = tiny_unet2d()
    x, _ = inputs(unet)
    with torch.no_grad(), deepcache(unet, CacheSettings(interval=2, branch=1), num_calls=4) as state:
        for _ in range(4):
            unet(x, T)  # same timestep every call
    assert state.full_calls == [0, 2] and state.retrieval_calls == 2


def test_batch_change_without_reset_is_an_error():
    unet = tiny_unet2d()
    x, _ = inputs(unet, batch=2)
    with torch.no_grad(), deepcache(unet, CacheSettings(interval=3, branch=1)) as state:
        unet(x, T)
        with pytest.raises(RuntimeError, match="batch size 1"):
            unet(x[:1], T)
        state.reset()
        unet(x[:1], T)
        assert state.full_calls == [0]


def test_nonuniform_schedule_drives_the_engine():
    unet = tiny_unet2d()
    settings = CacheSettings(interval=4, branch=2, schedule="nonuniform", center=3, power=1.4)
    plan = settings.full_calls(12)
    with deepcache(unet, settings, num_calls=12) as state:
        ddim_loop(unet, steps=12)
    assert state.full_calls == plan == state.plan
    with pytest.raises(CacheError, match="needs num_calls"):
        DeepCache(unet, settings)


# --- what the cache holds -------------------------------------------------------------
@pytest.mark.parametrize("kind", UNETS)
def test_stored_feature_holds_no_autograd_graph(kind):
    """With autograd on (parameters requiring grad, no ``no_grad``) the cache keeps no graph.

    A stored tensor that required grad would keep the whole full call's graph (and its
    activations) alive until the next full call.
    """
    unet = UNETS[kind]().requires_grad_(True)
    x, kw = inputs(unet)
    with deepcache(unet, CacheSettings(interval=2, branch=3)) as state:
        out = unet(x, T, **kw).sample
        assert out.requires_grad  # autograd really was recording the full call
        assert not state.stored.requires_grad and state.stored.grad_fn is None
        retr = unet(x, T, **kw).sample  # a retrieval call still runs with grad on
        assert state.retrieval_calls == 1 and torch.equal(retr, out.detach())


@pytest.mark.parametrize("kind", UNETS)
def test_stored_feature_owns_its_memory(kind):
    """The stored tensor is a copy, not a slice of the consumer's concatenated input.

    ``x[:, :C]`` of the concatenation ``[main, skip]`` is a view: it would keep the
    whole concatenated input (main path and skip) alive between full calls.
    """
    unet = UNETS[kind]()
    x, kw = inputs(unet)
    for s in skip_table(unet):
        seen = []
        consumer = unet.get_submodule(s.consumer)
        handle = consumer.register_forward_pre_hook(
            lambda m, a, k: seen.append(a[0] if a else k["input_tensor"]), with_kwargs=True
        )
        try:
            with torch.no_grad(), deepcache(unet, CacheSettings(interval=2, branch=s.branch)) as state:
                unet(x, T, **kw)
                stored = state.stored
        finally:
            handle.remove()
        (concatenated,) = seen
        assert concatenated.shape[1] == s.main_channels + s.skip_channels
        assert torch.equal(stored, concatenated[:, : s.main_channels]), s.branch
        assert stored.untyped_storage().data_ptr() != concatenated.untyped_storage().data_ptr(), s.branch
        assert stored.untyped_storage().nbytes() == stored.numel() * stored.element_size(), s.branch


# --- what a retrieval call refuses ----------------------------------------------------
@pytest.mark.parametrize(
    "key",
    ["down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals"],
)
def test_retrieval_refuses_controlnet_and_adapter_residuals(key):
    """Residuals added to the skips or the mid block cannot reach a cached feature: refuse them."""
    unet = tiny_unet2d_cond()
    x, kw = inputs(unet)
    with torch.no_grad(), deepcache(unet, CacheSettings(interval=2, branch=1)) as state:
        unet(x, T, **kw)  # full call: plain U-Net, residuals would be fine
        residual = torch.zeros(x.shape[0], 16, 2, 2)
        value = residual if key == "mid_block_additional_residual" else (residual,)
        with pytest.raises(CacheError, match=f"`{key}`"):
            unet(x, T, **kw, **{key: value})
        assert state.retrieval_calls == 0
        unet(x, T, **kw, **{key: None})  # None is the default and is accepted
        assert state.retrieval_calls == 1


# --- U-Nets the skip table refuses ------------------------------------------------------
def _tiny(down, up, **extra):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            norm_num_groups=4, down_block_types=down, up_block_types=up, **extra,
        ).eval()


@pytest.mark.parametrize(
    "down,up,path,cls",
    [
        (("DownBlock2D", "SkipDownBlock2D"), ("UpBlock2D", "UpBlock2D"), "down_blocks.1", "SkipDownBlock2D"),
        (("DownBlock2D", "DownBlock2D"), ("SkipUpBlock2D", "UpBlock2D"), "up_blocks.0", "SkipUpBlock2D"),
    ],
)
def test_skip_table_refuses_blocks_with_a_skip_conv(down, up, path, cls):
    """Score-SDE style blocks (a ``skip_conv`` path beside the resnets) are not supported."""
    unet = _tiny(down, up)
    assert hasattr(unet.get_submodule(path), "skip_conv")
    with pytest.raises(CacheError, match=rf"^{path} \({cls}\) is not a resnet/attention block"):
        skip_table(unet)
    with pytest.raises(CacheError, match=path):
        DeepCache(unet, CacheSettings(interval=2, branch=1))


def test_skip_table_refuses_a_block_without_resnets():
    unet = tiny_unet2d()
    unet.down_blocks[2] = nn.Identity()
    with pytest.raises(CacheError, match=r"^down_blocks.2 \(Identity\) is not a resnet/attention block"):
        skip_table(unet)


@pytest.mark.parametrize("where", ["down_blocks.1", "up_blocks.2"])
def test_skip_table_refuses_mismatched_resnets_and_attentions(where):
    unet = tiny_unet2d()  # down_blocks.1 and up_blocks.2 are attention blocks
    block = unet.get_submodule(where)
    block.attentions = nn.ModuleList(block.attentions[:1])
    n = len(block.resnets)
    with pytest.raises(CacheError, match=rf"^{where} pairs {n} resnets with 1 attentions$"):
        skip_table(unet)


def test_skip_table_refuses_several_downsamplers():
    unet = tiny_unet2d()
    block = unet.down_blocks[1]
    block.downsamplers = nn.ModuleList([block.downsamplers[0], block.downsamplers[0]])
    with pytest.raises(CacheError, match=r"^down_blocks.1 has 2 downsamplers$"):
        skip_table(unet)


@pytest.mark.parametrize("drop_from", ["down_blocks.0", "up_blocks.3"])
def test_skip_table_refuses_unpaired_skips(drop_from):
    """Every produced skip needs exactly one consumer."""
    unet = tiny_unet2d()
    block = unet.get_submodule(drop_from)
    block.resnets = nn.ModuleList(block.resnets[:-1])
    produced, consumed = (11, 12) if drop_from.startswith("down") else (12, 11)
    with pytest.raises(CacheError, match=rf"^UNet2DModel: {produced} skips produced but {consumed} consumed"):
        skip_table(unet)


def test_skip_table_refuses_a_consumer_without_a_main_path():
    """A consumer whose input is no wider than its skip cannot concatenate a main-path tensor."""
    unet = tiny_unet2d()
    consumer = unet.up_blocks[3].resnets[2]  # consumes conv_in's 8 channels
    consumer.in_channels = unet.conv_in.out_channels
    with pytest.raises(CacheError, match=r"^up_blocks.3.resnets.2 takes 8 channels, not more than its skip's 8$"):
        skip_table(unet)
