"""Block Caching (cache=block_caching): the schedule, the cached blocks, the no-op, the
restored U-Net, MACs on the meta device, the knobs, and one run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_unet2d, tiny_unet2d_cond

from bench.caching.block_caching import (
    BlockCaching,
    blocks_of,
    kind_of,
    measure_changes,
    recompute_schedule,
    unet_blocks,
)
from bench.caching.method import FULL, UNCACHED_KEY, CacheError, Caching, Plan, Target
from bench.cost.macs import count_macs

NUM_CALLS = 5


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.config.in_channels, 16, 16, generator=g)
    kwargs = {}
    if hasattr(unet.config, "cross_attention_dim") and unet.config.get("cross_attention_dim"):
        kwargs["encoder_hidden_states"] = torch.randn(batch, 4, unet.config.cross_attention_dim, generator=g)
    return x, kwargs


def _loop(unet, x, kwargs, num_calls=NUM_CALLS):
    """A toy sampling loop: ``num_calls`` calls, each feeding the next."""
    outs = []
    for i in range(num_calls):
        out = unet(x, torch.tensor(900 - 150 * i), **kwargs).sample
        outs.append(out)
        x = x - 0.2 * out
    return outs


def _calibrate(unet):
    def calibrate(samples):
        x, kwargs = _inputs(unet, samples, seed=1)
        with torch.inference_mode():
            _loop(unet, x, kwargs)
    return calibrate


MODELS = pytest.mark.parametrize("make", [tiny_unet2d, tiny_unet2d_cond], ids=["unet2d", "unet2d_cond"])


# -- the schedule ------------------------------------------------------------------------

def test_schedule_from_a_synthetic_trace_is_the_hand_computed_one():
    changes = [
        [0.0, 0.1, 0.1, 0.1, 0.1],   # accumulates .1 .2 .3 > .25 at call 3, then .1
        [0.0, 0.3, 0.0, 0.2, 0.1],   # .3 > .25 at 1; then 0, .2, .3 > .25 at 4
        [0.0, 0.0, 0.0, 0.0, 0.0],   # never changes: computed at call 0 only
        [9.0, 0.25, 0.01, 0.0, 0.0],  # exactly the threshold is not above it; call 0's value is not read
    ]
    sets = recompute_schedule(changes, 0.25)
    assert sets == [frozenset({0, 1, 2, 3}), frozenset({1}), frozenset({3}), frozenset({0}), frozenset({1})]
    assert [kind_of(s, 4) for s in sets] == [FULL, "r2", "r8", "r1", "r2"]
    # threshold 0: every block at every call
    assert recompute_schedule(changes, 0.0) == [frozenset(range(4))] * 5
    # a threshold above every accumulated change: only call 0
    assert recompute_schedule(changes, 100.0)[1:] == [frozenset()] * 4


def test_kinds_round_trip():
    for s in (frozenset(), frozenset({0}), frozenset({1, 5, 30}), frozenset(range(31))):
        assert blocks_of(kind_of(s, 32), 32) == s
    assert kind_of(frozenset(range(32)), 32) == FULL and blocks_of(FULL, 3) == {0, 1, 2}
    with pytest.raises(CacheError):
        blocks_of("r10", 4)  # block 4 of 4
    with pytest.raises(CacheError):
        blocks_of("retrieval", 4)


def test_blocks_are_the_stages_resnets_and_attentions_in_a_fixed_order():
    paths = [p for p, _ in unet_blocks(tiny_unet2d())]
    assert paths[:6] == ["down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "down_blocks.1.resnets.0",
                         "down_blocks.1.resnets.1", "down_blocks.1.attentions.0", "down_blocks.1.attentions.1"]
    assert "mid_block.attentions.0" in paths and paths[-1] == "up_blocks.3.resnets.2"
    assert not any("samplers" in p for p in paths)
    cond = [p for p, _ in unet_blocks(tiny_unet2d_cond())]
    assert sum(".attentions." in p for p in cond) == 2 * 3 + 1 + 3 * 3


@MODELS
def test_measured_changes_are_the_relative_l1_per_sample_averaged(make):
    unet = make()
    blocks = unet_blocks(unet)
    b, path = 3, blocks[3][0]
    changes = measure_changes(unet, blocks, NUM_CALLS, lambda: _calibrate(unet)(3))
    assert not unet._forward_pre_hooks and not any(m._forward_hooks for _, m in blocks)
    # independently: the block's outputs per call, then the formula by hand
    seen = []
    h = unet.get_submodule(path).register_forward_hook(lambda m, a, o: seen.append(
        (o[0] if isinstance(o, tuple) else o).detach().clone()))  # a transformer returns a tuple
    try:
        _calibrate(unet)(3)
    finally:
        h.remove()
    expect = [0.0]
    for t in range(1, NUM_CALLS):
        per_sample = [((seen[t][s] - seen[t - 1][s]).abs().sum() / seen[t][s].abs().sum()).item() for s in range(3)]
        expect.append(sum(per_sample) / 3)
    assert changes[b] == pytest.approx(expect, rel=1e-5)
    assert all(len(c) == NUM_CALLS for c in changes) and all(c[0] == 0 for c in changes)


def test_a_calibration_that_makes_the_wrong_number_of_calls_is_refused():
    unet = tiny_unet2d()
    x, kwargs = _inputs(unet)
    with pytest.raises(CacheError, match="calibration run made 3 model calls"):
        measure_changes(unet, unet_blocks(unet), NUM_CALLS, lambda: _loop(unet, x, kwargs, 3))


@MODELS
def test_plan_from_calibration(make):
    unet = make()
    method = BlockCaching(threshold=0.3, calibration_samples=2)
    plan = method.plan(unet, NUM_CALLS, Target(), _calibrate(unet))
    assert plan.kinds[0] == FULL and plan.num_calls == NUM_CALLS and plan.columns == (FULL,)
    assert any(k != FULL for k in plan.kinds), plan.kinds
    assert 0 < plan.detail["recomputed_fraction"] < 1
    assert method.key(plan) == {"method": "block_caching", "threshold": 0.3, "calibration_samples": 2,
                                "kinds": list(plan.kinds)}
    assert method.record(plan) == {"method": "block_caching", "label": "block_caching threshold=0.3 calibration_samples=2",
                                   "threshold": 0.3, "calibration_samples": 2}
    assert not unet._forward_pre_hooks and not any(m._forward_hooks for m in unet.modules())
    with pytest.raises(CacheError, match="calibrat"):
        method.plan(unet, NUM_CALLS, Target(), None)


# -- the cached blocks -------------------------------------------------------------------

def _substituting(unet, path, stored):
    """Independently of the method: the plain U-Net with ``path``'s output replaced."""
    return unet.get_submodule(path).register_forward_hook(lambda m, a, o: stored)


@MODELS
def test_a_cached_block_returns_exactly_its_stored_output(make):
    unet = make()
    blocks = unet_blocks(unet)
    n = len(blocks)
    cached = {1, 4, n - 2}  # a resnet, an attention, an up-path resnet
    kind = kind_of(frozenset(range(n)) - cached, n)
    plan = Plan((FULL, kind, kind), data=tuple(p for p, _ in blocks))
    x0, kwargs = _inputs(unet, seed=0)
    x1, _ = _inputs(unet, seed=1)
    x2, _ = _inputs(unet, seed=2)

    # the plain model's block outputs at call 0
    first = {}
    hooks = [blocks[b][1].register_forward_hook(lambda m, a, o, b=b: first.__setitem__(b, o)) for b in cached]
    with torch.inference_mode():
        ref0 = unet(x0, torch.tensor(900), **kwargs).sample
    for h in hooks:
        h.remove()
    # calls 1 and 2 of the plain model with those blocks' outputs substituted
    hooks = [_substituting(unet, blocks[b][0], first[b]) for b in cached]
    with torch.inference_mode():
        ref1 = unet(x1, torch.tensor(750), **kwargs).sample
        ref2 = unet(x2, torch.tensor(600), **kwargs).sample
    for h in hooks:
        h.remove()

    method = BlockCaching(threshold=0.5)
    seen = []
    probe = blocks[4][1].register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.inference_mode(), method.attach(unet, plan, Target()) as session:
        out0 = unet(x0, torch.tensor(900), **kwargs).sample
        out1 = unet(x1, torch.tensor(750), **kwargs).sample
        out2 = unet(x2, torch.tensor(600), **kwargs).sample
    probe.remove()
    assert session.executed == [FULL, kind, kind]
    assert torch.equal(out0, ref0) and torch.equal(out1, ref1) and torch.equal(out2, ref2)
    assert seen[1] is seen[0] and seen[2] is seen[0]  # the stored return value itself
    assert not torch.equal(out1, unet(x1, torch.tensor(750), **kwargs).sample)  # caching changed something


@MODELS
def test_noop_is_bit_exact_with_the_plain_model(make):
    unet = make()
    method = BlockCaching(threshold=0.0)
    assert not method.enabled
    plan = method.plan(unet, NUM_CALLS, Target(), None)
    assert plan.kinds == (FULL,) * NUM_CALLS
    assert Caching(method, plan).key() == UNCACHED_KEY
    x, kwargs = _inputs(unet)
    with torch.inference_mode():
        ref = _loop(unet, x, kwargs)
        with method.attach(unet, plan, Target()) as session:
            got = _loop(unet, x, kwargs)
    assert session.executed == [FULL] * NUM_CALLS
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_an_all_full_plan_of_an_enabled_method_is_bit_exact():
    unet = tiny_unet2d_cond()
    plan = Plan((FULL,) * NUM_CALLS, data=tuple(p for p, _ in unet_blocks(unet)))
    x, kwargs = _inputs(unet)
    with torch.inference_mode():
        ref = _loop(unet, x, kwargs)
        with BlockCaching(threshold=0.5).attach(unet, plan, Target()):
            got = _loop(unet, x, kwargs)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


@MODELS
def test_the_unet_is_restored_exactly(make):
    unet = make()

    def theirs(*a, **k):
        return type(unet).forward(unet, *a, **k)

    unet.forward = theirs  # someone else's instance forward is kept and put back
    before = {name: m.__dict__.get("forward") for name, m in unet.named_modules()}
    children = [(name, id(m)) for name, m in unet.named_modules()]
    method = BlockCaching(threshold=0.3, calibration_samples=1)
    plan = method.plan(unet, NUM_CALLS, Target(), _calibrate(unet))
    x, kwargs = _inputs(unet)
    with torch.inference_mode(), method.attach(unet, plan, Target()):
        _loop(unet, x, kwargs)
        assert unet.get_submodule(unet_blocks(unet)[0][0]).__dict__.get("forward") is not None
    assert {name: m.__dict__.get("forward") for name, m in unet.named_modules()} == before
    assert unet.forward is theirs
    assert [(name, id(m)) for name, m in unet.named_modules()] == children
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    with pytest.raises(RuntimeError, match="boom"):  # restored after an error too
        with method.attach(unet, plan, Target()):
            raise RuntimeError("boom")
    assert {name: m.__dict__.get("forward") for name, m in unet.named_modules()} == before


def test_another_batch_size_on_a_cached_call_is_a_clear_error():
    unet = tiny_unet2d()
    n = len(unet_blocks(unet))
    plan = Plan((FULL, "r0"), data=tuple(p for p, _ in unet_blocks(unet)))
    x, _ = _inputs(unet, batch=2)
    with torch.inference_mode(), BlockCaching(threshold=0.5).attach(unet, plan, Target()) as session:
        unet(x, torch.tensor(900))
        with pytest.raises(RuntimeError, match="batch size 1 .* have 2"):
            unet(x[:1], torch.tensor(800))
        session.reset()
        unet(x[:1], torch.tensor(900))  # a new run: call 0 recomputes everything
        unet(x[:1], torch.tensor(800))
        assert session.executed == [FULL, "r0"]
    assert n > 0


def test_force_before_anything_is_stored_runs_full_and_the_counter_wraps_keeping_outputs():
    unet = tiny_unet2d()
    plan = Plan((FULL, "r0"), data=tuple(p for p, _ in unet_blocks(unet)))
    x, _ = _inputs(unet)
    with torch.inference_mode(), BlockCaching(threshold=0.5).attach(unet, plan, Target()) as session:
        session.force("r0")
        unet(x, torch.tensor(900))
        assert session.executed == [FULL]
        unet(x, torch.tensor(900))
        unet(x, torch.tensor(900))  # wraps: a new run, still forced, reads the stored outputs
        assert session.executed == ["r0"] and session.runs == 2
        with pytest.raises(CacheError):
            session.force("r1")  # not in this plan


@MODELS
def test_force_on_the_meta_device_counts_fewer_macs_for_cached_kinds(make):
    config = make().config
    with torch.device("meta"):
        meta = type(make()).from_config(config)
    blocks = unet_blocks(meta)
    n = len(blocks)
    half = kind_of(frozenset(range(0, n, 2)), n)
    plan = Plan((FULL, half, "r0", half), data=tuple(p for p, _ in blocks))
    x = torch.empty(1, config.in_channels, 16, 16, device="meta")
    t = torch.tensor([500], device="meta")
    kwargs = {}
    if config.get("cross_attention_dim"):
        kwargs["encoder_hidden_states"] = torch.empty(1, 4, config.cross_attention_dim, device="meta")
    full = count_macs(meta, x, t, **kwargs)
    out = {}
    with BlockCaching(threshold=0.5).attach(meta, plan, Target()) as session:
        for kind in plan.distinct():
            session.force(kind)
            out[kind] = count_macs(meta, x, t, **kwargs)
    assert session.executed == [FULL, half, "r0"]
    assert out[FULL].paper == full.paper
    assert 0 < out["r0"].paper < out[half].paper < full.paper


# -- the knobs ---------------------------------------------------------------------------

@pytest.mark.parametrize("knobs, name", [
    ({"threshold": -0.1}, "cache.threshold"),
    ({"threshold": float("nan")}, "cache.threshold"),
    ({"threshold": "high"}, "cache.threshold"),
    ({"threshold": True}, "cache.threshold"),
    ({"calibration_samples": 0}, "cache.calibration_samples"),
    ({"calibration_samples": 1.5}, "cache.calibration_samples"),
    ({"calibration_samples": False}, "cache.calibration_samples"),
    ({"interval": 3}, "cache.interval"),
])
def test_bad_knobs_are_one_line_naming_the_knob(knobs, name):
    with pytest.raises(CacheError) as e:
        BlockCaching.from_settings(knobs, {})
    assert name in str(e.value) and "\n" not in str(e.value)


def test_knob_defaults_and_class_values():
    m = BlockCaching.from_settings({"threshold": 1}, {})
    assert m.threshold == 1.0 and isinstance(m.threshold, float) and m.calibration_samples == 4
    assert m.enabled and m.needs_calibration
    assert not BlockCaching(**{**BlockCaching.example_knobs, **BlockCaching.noop_knobs}).enabled
    assert BlockCaching(**BlockCaching.example_knobs).enabled
    for k, v in BlockCaching.other_values.items():
        assert BlockCaching(**{**BlockCaching.example_knobs, k: v}) != BlockCaching(**BlockCaching.example_knobs)


# -- end to end --------------------------------------------------------------------------

@pytest.mark.integration
def test_a_run_end_to_end(tmp_path):
    from harness import run_py

    r = run_py("cache=block_caching", "sampler.steps=10", "run.num_samples=8", "run.batch_size=4",
               "run.timing=off", "run.progress=false", f"run.store_dir={tmp_path}/store",
               f"metrics.cache_dir={tmp_path}/metrics", f"hydra.run.dir={tmp_path}/out", "quality.is_split_size=8")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["status"] == "ok"
    assert rec["cache"]["method"] == "block_caching"
    assert rec["cache"]["threshold"] == 0.1 and rec["cache"]["calibration_samples"] == 4
    assert 0 < rec["cache"]["recomputed_fraction"] < 1
