"""Faster Diffusion's encoder propagation (bench.caching.faster_diffusion) on tiny U-Nets:
decoder calls against a hand-computed decoder on features stored independently, the U-Net
left as it was, the no-op, forcing kinds on the meta device, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from bench.caching.faster_diffusion import DECODER, FasterDiffusion
from bench.caching.method import FULL, CacheError, Target
from harness import compose_cfg, run_py
from tiny import tiny_unet2d, tiny_unet2d_cond

GUIDED = Target(conditioning="text", guided=True)


def _encoder_outputs(unet, *args, **kwargs):
    """A plain forward, keeping conv_in's, every down block's and the mid block's outputs."""
    got = {}
    modules = {"conv_in": unet.conv_in, "mid": unet.mid_block,
               **{f"down{b}": blk for b, blk in enumerate(unet.down_blocks)}}
    handles = [m.register_forward_hook(lambda m, a, o, k=k: got.__setitem__(k, o)) for k, m in modules.items()]
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    skips = (got["conv_in"],)
    for b in range(len(unet.down_blocks)):
        skips += tuple(got[f"down{b}"][1])
    return skips, got["mid"]


def _manual_decoder(unet, skips, mid, t, batch, ehs=None):
    """Time embedding of ``t`` + up blocks + conv_norm_out/act/conv_out, by hand."""
    with torch.no_grad():
        emb = unet.time_embedding(unet.time_proj(torch.full((batch,), t)).to(torch.float32))
        h = mid
        for block in unet.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=ehs)
            else:
                h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def _calls(unet, method, target, inputs):
    plan = method.plan(unet, len(inputs), target)
    outs = []
    with torch.no_grad(), method.attach(unet, plan, target) as session:
        for args, kwargs in inputs:
            outs.append(unet(*args, **kwargs).sample)
    return outs, session


def test_decoder_call_is_the_decoder_on_the_key_calls_encoder_features():
    unet = tiny_unet2d()
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    skips, mid = _encoder_outputs(unet, x0, 900)
    outs, session = _calls(unet, FasterDiffusion(interval=2), Target(), [((x0, 900), {}), ((x1, 700), {})])
    assert session.executed == [FULL, DECODER]
    with torch.no_grad():
        assert torch.equal(outs[0], unet(x0, 900).sample)  # the key call is the plain call
    expected = _manual_decoder(unet, skips, mid, 700, 2)
    torch.testing.assert_close(outs[1], expected, rtol=0, atol=1e-6)
    # the decoder call never reads its own latent
    outs2, _ = _calls(unet, FasterDiffusion(interval=2), Target(), [((x0, 900), {}), ((x1 * 3 + 1, 700), {})])
    assert torch.equal(outs2[1], outs[1])


def test_guided_decoder_call_uses_each_halfs_features_and_the_current_text():
    unet = tiny_unet2d_cond()
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 16, 16, generator=g)
    x0 = torch.cat([latent, latent])  # [uncond; cond]: identical latents, different text
    ehs0 = torch.randn(2, 5, 16, generator=g)
    ehs1 = torch.randn(2, 5, 16, generator=g)  # the next call's text (changes what the up blocks see)
    skips, mid = _encoder_outputs(unet, x0, 900, encoder_hidden_states=ehs0)
    assert not torch.equal(mid[0], mid[1])  # the halves' encoder features differ
    x1 = torch.randn(2, 4, 16, 16, generator=g)
    outs, session = _calls(unet, FasterDiffusion(key_calls=[0]), GUIDED,
                           [((x0, 900), {"encoder_hidden_states": ehs0}),
                            ((x1, 600), {"encoder_hidden_states": ehs1}),
                            ((x1, 300), {"encoder_hidden_states": ehs1})])
    assert session.executed == [FULL, DECODER, DECODER]
    torch.testing.assert_close(outs[1], _manual_decoder(unet, skips, mid, 600, 2, ehs1), rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[2], _manual_decoder(unet, skips, mid, 300, 2, ehs1), rtol=0, atol=1e-6)
    # each half decodes its own half's features: the uncond half alone gives the same
    skips_u, mid_u = tuple(s[:1] for s in skips), mid[:1]
    torch.testing.assert_close(outs[1][:1], _manual_decoder(unet, skips_u, mid_u, 600, 1, ehs1[:1]),
                               rtol=0, atol=1e-6)


def _snapshot(unet):
    return {
        "dict": dict(unet.__dict__),
        "modules": [(n, id(m), dict(m._modules), dict(m._forward_hooks), dict(m._forward_pre_hooks),
                     "forward" in m.__dict__) for n, m in unet.named_modules()],
        "state": {k: v.clone() for k, v in unet.state_dict().items()},
    }


@pytest.mark.parametrize("build", [tiny_unet2d, tiny_unet2d_cond], ids=["unet2d", "unet2d_cond"])
def test_the_unet_is_left_exactly_as_it_was(build):
    unet = build()
    before = _snapshot(unet)
    kwargs = {"encoder_hidden_states": torch.randn(1, 5, 16)} if isinstance(unet, UNet2DConditionModel) else {}
    x = torch.randn(1, unet.config.in_channels, 16, 16)
    with torch.no_grad():
        plain = unet(x, 500, **kwargs).sample
    outs, session = _calls(unet, FasterDiffusion(interval=2), Target(), [((x, 500), kwargs)] * 3)
    assert session.executed == [FULL, DECODER, FULL] and session.stored is None
    after = _snapshot(unet)
    assert after["dict"].keys() == before["dict"].keys() and "forward" not in unet.__dict__
    assert after["modules"] == before["modules"]
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    with torch.no_grad():
        assert torch.equal(unet(x, 500, **kwargs).sample, plain)


def test_an_instance_forward_set_by_someone_else_runs_the_key_calls_and_is_put_back():
    unet = tiny_unet2d()
    seen = []

    def theirs(*a, **k):
        seen.append(1)
        return UNet2DModel.forward(unet, *a, **k)

    unet.forward = theirs
    x = torch.randn(1, 3, 16, 16)
    _calls(unet, FasterDiffusion(interval=2), Target(), [((x, 500), {})] * 2)
    assert seen == [1] and unet.__dict__["forward"] is theirs


def test_noop_settings_reproduce_the_plain_model_bit_exactly():
    method = FasterDiffusion(**FasterDiffusion.noop_knobs)
    assert not method.enabled and FasterDiffusion(**FasterDiffusion.example_knobs).enabled
    unet = tiny_unet2d_cond()
    g = torch.Generator().manual_seed(2)
    inputs = [((torch.randn(2, 4, 16, 16, generator=g), t), {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g)})
              for t in (900, 600, 300)]
    outs, session = _calls(unet, method, GUIDED, inputs)
    assert session.executed == [FULL] * 3
    with torch.no_grad():
        for out, (args, kwargs) in zip(outs, inputs):
            assert torch.equal(out, unet(*args, **kwargs).sample)


def _ddim_images(unet, method, steps=10):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    plan = method.plan(unet, steps, Target())
    with torch.no_grad(), method.attach(unet, plan, Target()):
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_every_other_value_changes_the_images():
    unet = tiny_unet2d()
    example = _ddim_images(unet, FasterDiffusion(**FasterDiffusion.example_knobs))
    for knob, value in FasterDiffusion.other_values.items():
        other = _ddim_images(unet, FasterDiffusion(**{**FasterDiffusion.example_knobs, knob: value}))
        assert not torch.allclose(other, example, atol=1e-4), knob
    plain = _ddim_images(unet, FasterDiffusion(**FasterDiffusion.noop_knobs))
    assert not torch.allclose(plain, example, atol=1e-4)


def test_plan_key_and_record():
    unet = tiny_unet2d()
    plan = FasterDiffusion(interval=4).plan(unet, 10, Target())
    assert plan.full_calls == [0, 4, 8] and plan.columns == (FULL, DECODER) and plan.distinct() == [FULL, DECODER]
    paper = FasterDiffusion(key_calls=[0, 1, 2, 3, 5, 10, 15, 25, 35])
    plan50 = paper.plan(unet, 50, Target())
    assert plan50.full_calls == [0, 1, 2, 3, 5, 10, 15, 25, 35] and plan50.counts() == {FULL: 9, DECODER: 41}
    assert paper.key(plan50) == {"method": "faster_diffusion", "key_calls": [0, 1, 2, 3, 5, 10, 15, 25, 35]}
    assert paper.record(plan50) == {"method": "faster_diffusion", "interval": 4,
                                    "key_calls": [0, 1, 2, 3, 5, 10, 15, 25, 35],
                                    "label": "faster_diffusion key_calls=0,1,2,3,5,10,15,25,35"}
    assert hash(paper) == hash(FasterDiffusion(key_calls=(0, 1, 2, 3, 5, 10, 15, 25, 35)))


def test_the_counter_wraps_and_a_new_run_starts_from_a_key_call():
    unet = tiny_unet2d()
    x = torch.randn(1, 3, 16, 16)
    method = FasterDiffusion(interval=2)
    plan = method.plan(unet, 3, Target())
    with torch.no_grad(), method.attach(unet, plan, Target()) as session:
        first = [unet(x * (i + 1), 900 - 100 * i).sample for i in range(3)]
        second = [unet(x * (i + 1), 900 - 100 * i).sample for i in range(3)]
        assert session.executed == [FULL, DECODER, FULL] and session.runs == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_force_works_on_the_meta_device():
    from bench.cost.macs import count_macs

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(tiny_unet2d_cond().config)
    x = torch.empty(2, 4, 16, 16, device="meta")
    t = torch.tensor([500], device="meta")
    ehs = torch.empty(2, 5, 16, device="meta")
    method = FasterDiffusion(interval=4)
    plan = method.plan(unet, 20, GUIDED)
    with method.attach(unet, plan, GUIDED) as session:
        macs = {}
        for kind in plan.distinct():
            session.force(kind)
            macs[kind] = count_macs(unet, x, t, encoder_hidden_states=ehs)
        session.force(DECODER)
        out = unet(x, t, encoder_hidden_states=ehs).sample
        assert session.executed == [FULL, DECODER, DECODER]
    assert out.device.type == "meta" and out.shape == x.shape
    assert 0 < macs[DECODER].paper < macs[FULL].paper


@pytest.mark.parametrize("knobs,expect", [
    ({"interval": 0}, "cache.interval must be an integer >= 1, got 0"),
    ({"interval": 2.5}, "cache.interval must be an integer >= 1, got 2.5"),
    ({"interval": "4"}, "cache.interval must be an integer >= 1, got 4"),
    ({"key_calls": [1, 5]}, "cache.key_calls=[1, 5] must be a list of call indices, sorted, unique, starting at 0"),
    ({"key_calls": [0, 5, 3]}, "cache.key_calls=[0, 5, 3] must be a list"),
    ({"key_calls": [0, 3, 3]}, "cache.key_calls=[0, 3, 3] must be a list"),
    ({"key_calls": []}, "cache.key_calls=[] must be a list"),
    ({"key_calls": 5}, "cache.key_calls=5 must be a list"),
    ({"key_calls": "0,5"}, "cache.key_calls=0,5 must be a list"),
    ({"key_calls": [0, 1.5]}, "cache.key_calls=[0, 1.5] must be a list"),
])
def test_bad_knobs_are_refused_in_one_line(knobs, expect):
    with pytest.raises(CacheError) as e:
        FasterDiffusion(**knobs)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_check_refuses_in_one_line():
    unet = tiny_unet2d()
    with pytest.raises(CacheError, match=r"cache.key_calls=\[0, 5, 10\] must lie in \[0, 10\)"):
        FasterDiffusion(key_calls=[0, 5, 10]).check(unet, 10, Target())
    FasterDiffusion(key_calls=[0, 5, 9]).check(unet, 10, Target())
    with pytest.raises(CacheError, match="supports diffusers UNet2DModel / UNet2DConditionModel, not Linear"):
        FasterDiffusion().check(torch.nn.Linear(2, 2), 10, Target())
    with pytest.raises(CacheError) as e:
        FasterDiffusion.check_knobs({"intervall": 3})
    assert str(e.value) == "cache.intervall is not a setting of cache=faster_diffusion: interval, key_calls"


def test_controlnet_residuals_and_unknown_kinds_are_refused():
    unet = tiny_unet2d_cond()
    method = FasterDiffusion(interval=2)
    plan = method.plan(unet, 4, Target())
    x, ehs = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 16)
    with torch.no_grad(), method.attach(unet, plan, Target()) as session:
        with pytest.raises(CacheError, match="does not support `mid_block_additional_residual`"):
            unet(x, 500, encoder_hidden_states=ehs, mid_block_additional_residual=torch.zeros(1, 16, 2, 2))
        with pytest.raises(CacheError, match="faster_diffusion has no call of kind 'retrieval': full, decoder"):
            session.force("retrieval")
        with pytest.raises(CacheError, match="already attached"):
            with method.attach(unet, plan, Target()):
                pass
    assert "forward" not in unet.__dict__


def test_the_config_builds_the_method():
    from bench.run import parts

    cfg = compose_cfg("cache=faster_diffusion")
    assert parts.cache_settings(cfg.cache, cfg.model) == FasterDiffusion(interval=4, key_calls=None)
    cfg = compose_cfg("cache=faster_diffusion", "cache.key_calls=[0,1,2,3,5,10,15,25,35]")
    assert parts.cache_settings(cfg.cache, cfg.model).key_calls == (0, 1, 2, 3, 5, 10, 15, 25, 35)


@pytest.mark.integration
def test_run_py_end_to_end(tmp_path):
    r = run_py("cache=faster_diffusion", "sampler.steps=10", "run.num_samples=8", "run.batch_size=4",
               "run.timing=off", "run.progress=false", f"run.store_dir={tmp_path}/store",
               f"metrics.cache_dir={tmp_path}/metrics", f"hydra.run.dir={tmp_path}/out", "quality.is_split_size=8")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["status"] == "ok" and rec["cache"]["method"] == "faster_diffusion"
    assert rec["full_calls"] == [0, 4, 8]
