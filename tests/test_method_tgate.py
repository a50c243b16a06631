"""T-GATE (cache=tgate, bench/caching/tgate.py) on tiny diffusers U-Nets."""

from __future__ import annotations

import json

import pytest
import torch

from bench.caching.engine import RETRIEVAL
from bench.caching.method import FULL, UNCACHED_KEY, Caching, CacheError, Plan, Target
from bench.caching.tgate import GATE, GATED, GATED_RETRIEVAL, TGate, cross_attentions
from bench.cost import macs
from harness import compose_cfg, run_py
from tiny import tiny_sd_pipeline, tiny_unet2d, tiny_unet2d_cond

TEXT = Target(conditioning="text", guided=True)
CALLS = 8


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d_cond()


def _inputs(guided: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(4, 5, 16, generator=g)  # [uncond; cond] for two images
    if guided:
        return torch.cat([x, x]), ctx
    return x, ctx[2:]


def _run(unet, method: TGate, target: Target = TEXT, calls: int = CALLS, guided: bool = True):
    """``calls`` calls with the method attached (the same latents each call, timesteps falling)."""
    x, ctx = _inputs(guided)
    plan = method.plan(unet, calls, target)
    outs = []
    with torch.no_grad(), method.attach(unet, plan, target) as session:
        for i in range(calls):
            outs.append(unet(x, torch.tensor(900 - 100 * i), encoder_hidden_states=ctx).sample)
        executed = list(session.executed)
        stored = {m: v.clone() for m, v in session.stored.items()}
    return plan, outs, executed, stored


def _plain(unet, calls: int = CALLS, guided: bool = True):
    x, ctx = _inputs(guided)
    with torch.no_grad():
        return [unet(x, torch.tensor(900 - 100 * i), encoder_hidden_states=ctx).sample for i in range(calls)]


# ------------------------------------------------------------------------------------------- plan


def test_plans():
    assert TGate(gate_step=4).kinds(8) == (FULL,) * 3 + (GATE,) + (GATED,) * 4
    assert TGate(gate_step=1).kinds(3) == (GATE, GATED, GATED)
    # DeepCache on top: uniform before the gate, full at the gate and the first gated call,
    # the interval restarting there (the public code resets DeepCache at both)
    assert TGate(gate_step=5, deepcache_interval=3).kinds(10) == (
        FULL, RETRIEVAL, RETRIEVAL, FULL, GATE, GATED, GATED_RETRIEVAL, GATED_RETRIEVAL, GATED, GATED_RETRIEVAL)
    # no gated call within the run: no gate
    assert TGate(gate_step=8).kinds(8) == (FULL,) * 8
    assert TGate(gate_step=None, deepcache_interval=2).kinds(4) == (FULL, RETRIEVAL, FULL, RETRIEVAL)
    assert not TGate(gate_step=None).enabled and TGate().enabled


def test_knobs_are_checked_in_one_line():
    for knobs, name in (({"gate_step": 0}, "cache.gate_step"), ({"gate_step": 2.5}, "cache.gate_step"),
                        ({"deepcache_interval": 0}, "cache.deepcache_interval"),
                        ({"deepcache_branch": 0}, "cache.deepcache_branch")):
        with pytest.raises(CacheError) as e:
            TGate(**knobs)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CacheError, match="cache.sp_interval is not a setting of cache=tgate"):
        TGate.from_settings({"sp_interval": 2}, {})


def test_refuses_models_without_text_or_cross_attention(unet):
    for u, target in ((tiny_unet2d(), Target("none")), (tiny_unet2d_cond(), Target("class", True))):
        with pytest.raises(CacheError) as e:
            TGate().check(u, 25, target)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("cache=tgate") and "not text-conditioned" in msg
    with pytest.raises(CacheError, match="no cross-attention modules") as e:
        TGate().check(tiny_unet2d(), 25, TEXT)
    assert "\n" not in str(e.value)
    with pytest.raises(CacheError, match="cache.deepcache_branch=13") as e:
        TGate(deepcache_interval=2, deepcache_branch=13).check(unet, 25, TEXT)
    TGate(deepcache_interval=2, deepcache_branch=12).check(unet, 25, TEXT)


def test_key_and_record():
    m = TGate(gate_step=4, deepcache_interval=2)
    plan = m.plan(None, 6, TEXT)
    assert m.key(plan) == {"method": "tgate", "gate_step": 4, "deepcache_interval": 2, "deepcache_branch": 1,
                           "kinds": list(plan.kinds)}
    assert m.record(plan) == {"method": "tgate", "label": "tgate gate_step=4 + deepcache N=2 branch 1",
                              "gate_step": 4, "deepcache_interval": 2, "deepcache_branch": 1}
    off = TGate(gate_step=None)
    assert Caching(off, off.plan(None, 6, TEXT), TEXT).key() == UNCACHED_KEY
    assert "gate_step=4" in m.label()


# ------------------------------------------------------------------------------------------- behaviour


def test_cross_attention_not_executed_after_the_gate(unet):
    modules = [m for _, m in cross_attentions(unet)]
    assert len(modules) == 16  # SD layout: 3 down blocks x 2, the mid block's 1, 3 up blocks x 3
    assert all(name.endswith("attn2") for name, _ in cross_attentions(unet))
    per_call: list[int] = []
    count = [0]
    handles = [m.to_q.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1)) for m in modules]
    try:
        m = TGate(gate_step=3)
        x, ctx = _inputs()
        plan = m.plan(unet, 6, TEXT)
        with torch.no_grad(), m.attach(unet, plan, TEXT) as session:
            for i in range(6):
                count[0] = 0
                unet(x, torch.tensor(900 - 100 * i), encoder_hidden_states=ctx)
                per_call.append(count[0])
    finally:
        for h in handles:
            h.remove()
    assert session.executed == [FULL, FULL, GATE, GATED, GATED, GATED]
    assert per_call == [len(modules)] * 3 + [0] * 3


def _attn_outputs(unet, x, t, ctx) -> dict:
    """Every cross-attention module's output in a plain forward (hooks)."""
    out: dict = {}
    handles = [m.register_forward_hook(lambda mod, a, o: out.__setitem__(mod, o.detach().clone()))
               for _, m in cross_attentions(unet)]
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)
    finally:
        for h in handles:
            h.remove()
    return out


def test_stored_is_the_mean_of_the_halves_and_gated_output_is_one_half_with_ca_replaced(unet):
    x, ctx = _inputs()
    m = TGate(gate_step=3)
    _, outs, executed, stored = _run(unet, m, calls=5)
    assert executed == [FULL, FULL, GATE, GATED, GATED]
    plain = _plain(unet, 5)
    for i in range(3):  # plain and gate calls are the uncached model's calls
        assert torch.equal(outs[i], plain[i])
    ref = _attn_outputs(unet, x, torch.tensor(700), ctx)  # the gate call's inputs
    assert set(stored) == set(ref)
    for mod, o in ref.items():
        u, c = o.chunk(2)
        torch.testing.assert_close(stored[mod], (u + c) / 2, rtol=0, atol=1e-6)

    # after the gate: the U-Net on the first half, each cross-attention returning the mean by hand
    n = x.shape[0] // 2
    saved = {mod: mod.__dict__.get("forward") for mod in ref}
    try:
        for mod, o in ref.items():
            u, c = o.chunk(2)
            mod.forward = (lambda v: lambda *a, **k: v)((u + c) / 2)
        with torch.no_grad():
            by_hand = [unet(x[:n], torch.tensor(900 - 100 * i), encoder_hidden_states=ctx[:n]).sample
                       for i in (3, 4)]
    finally:
        for mod in ref:
            mod.__dict__.pop("forward", None)
    assert all(v is None for v in saved.values())
    for out, h in zip(outs[3:], by_hand):
        assert out.shape == x.shape
        torch.testing.assert_close(out, torch.cat([h, h]), rtol=0, atol=1e-6)
        # the loop's guidance formula then yields the half's output whatever the scale
        eu, ec = out.chunk(2)
        assert torch.equal(eu + 7.5 * (ec - eu), h) or torch.allclose(eu + 7.5 * (ec - eu), h, atol=1e-6)


def test_unguided_text_model_keeps_the_batch(unet):
    target = Target("text", guided=False)
    x, ctx = _inputs(guided=False)
    _, outs, executed, stored = _run(unet, TGate(gate_step=2), target, calls=4, guided=False)
    assert executed == [FULL, GATE, GATED, GATED]
    ref = _attn_outputs(unet, x, torch.tensor(800), ctx)
    for mod, o in ref.items():
        torch.testing.assert_close(stored[mod], o, rtol=0, atol=0)
    assert all(o.shape == x.shape for o in outs)


def test_noop_settings_are_bit_exact(unet):
    plain = _plain(unet, 4)
    for m in (TGate(gate_step=None), TGate(gate_step=4), TGate(gate_step=40, deepcache_interval=1)):
        _, outs, executed, _ = _run(unet, m, calls=4)
        assert executed == [FULL] * 4
        assert all(torch.equal(a, b) for a, b in zip(outs, plain))
    noop = TGate(**{**TGate.example_knobs, **TGate.noop_knobs})
    assert not noop.enabled


def _tree(unet):
    return ([(n, type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks), "forward" in m.__dict__)
             for n, m in unet.named_modules()], {k: v.clone() for k, v in unet.state_dict().items()})


def test_module_tree_restored(unet):
    before, params = _tree(unet)
    _run(unet, TGate(gate_step=3, deepcache_interval=2, deepcache_branch=3), calls=6)
    after, params2 = _tree(unet)
    assert before == after
    assert all(torch.equal(params[k], params2[k]) for k in params)
    # an instance forward set by someone else is kept
    marker = lambda *a, **k: type(unet).forward(unet, *a, **k)
    unet.forward = marker
    try:
        _run(unet, TGate(gate_step=2), calls=3)
        assert unet.__dict__["forward"] is marker
    finally:
        del unet.forward


def test_composition_with_deepcache_runs_the_planned_kinds(unet):
    m = TGate(gate_step=4, deepcache_interval=2, deepcache_branch=2)
    mids: list[int] = []
    h = unet.mid_block.register_forward_hook(lambda *_: mids.__setitem__(-1, mids[-1] + 1))
    x, ctx = _inputs()
    plan = m.plan(unet, CALLS, TEXT)
    assert plan.kinds == (FULL, RETRIEVAL, FULL, GATE, GATED, GATED_RETRIEVAL, GATED, GATED_RETRIEVAL)
    try:
        with torch.no_grad(), m.attach(unet, plan, TEXT) as session:
            for run in range(2):  # the counter wraps: a second run needs no reset
                mids.clear()
                for i in range(CALLS):
                    mids.append(0)
                    out = unet(x, torch.tensor(900 - 100 * i), encoder_hidden_states=ctx).sample
                    assert out.shape == x.shape
                assert session.executed == list(plan.kinds)
                assert mids == [0 if k in (RETRIEVAL, GATED_RETRIEVAL) else 1 for k in plan.kinds]
    finally:
        h.remove()
    _, alone, _, _ = _run(unet, TGate(gate_step=4))
    _, composed, _, _ = _run(unet, m)
    assert torch.equal(alone[3], composed[3]) and not torch.equal(alone[5], composed[5])


def test_force_on_meta(unet):
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    x = torch.empty(2, 4, 16, 16, device="meta")
    ctx = torch.empty(2, 5, 16, device="meta")
    m = TGate(gate_step=3, deepcache_interval=2)
    plan = m.plan(meta, 8, TEXT)
    with m.attach(meta, plan, TEXT) as session:
        for kind in plan.distinct():
            session.force(kind)
            assert meta(x, torch.tensor(500), encoder_hidden_states=ctx).sample.shape == x.shape
        assert session.executed == plan.distinct() == [FULL, RETRIEVAL, GATE, GATED, GATED_RETRIEVAL]


@pytest.mark.integration
def test_force_on_meta_counts_a_gated_call_as_half(unet):
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    x = torch.empty(2, 4, 16, 16, device="meta")
    ctx = torch.empty(2, 5, 16, device="meta")
    t = torch.tensor([500], device="meta")
    m = TGate(gate_step=3, deepcache_interval=2)
    plan = m.plan(meta, 8, TEXT)
    full = macs.count_macs(meta, x, t, encoder_hidden_states=ctx).paper / 2
    out = {}
    with m.attach(meta, plan, TEXT) as session:
        for kind in plan.distinct():
            session.force(kind)
            out[kind] = macs.count_macs(meta, x, t, encoder_hidden_states=ctx).paper / 2
        assert session.executed == plan.distinct()
        session.force(None)
    assert out[FULL] == out[GATE] == full
    assert out[RETRIEVAL] < full
    ca = sum(1 for _ in cross_attentions(meta))
    assert out[GATED] < full / 2 and ca  # half the batch, cross-attention's projections skipped
    assert out[GATED_RETRIEVAL] == pytest.approx(out[RETRIEVAL] / 2, rel=0.3)
    assert out[GATED_RETRIEVAL] < out[GATED]


def test_force_a_gated_call_before_any_gate_refuses(unet):
    m = TGate(gate_step=2)
    x, ctx = _inputs()
    with torch.no_grad(), m.attach(unet, m.plan(unet, 4, TEXT), TEXT) as session:
        session.force(GATED)
        with pytest.raises(RuntimeError, match="gate"):
            unet(x, torch.tensor(500), encoder_hidden_states=ctx)
        with pytest.raises(CacheError, match="no call of kind"):
            session.force("retrieval")


# ------------------------------------------------------------------------------------------- runner


def test_summary_row_of_a_tgate_record():
    from bench.report.table import format_row

    row = {**TGate(gate_step=4).record(Plan(())), "gate_call": 3, "steps": 8}
    assert format_row(row).startswith("8 steps, tgate gate_step=4")


@pytest.mark.integration
def test_end_to_end_on_tiny_sd(tmp_path, monkeypatch):
    from bench.run.runner import run

    pipe = tiny_sd_pipeline(tmp_path / "build")
    pipe.save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red bicycle\na photo of a cat\n")
    cfg = compose_cfg(
        "model=sd15", f"model.pretrained={tmp_path}/sd", "sampler=ddim", "sampler.steps=8",
        "cache=tgate", "cache.gate_step=4", "run.num_samples=2", "run.batch_size=2",
        f"run.prompts.source={tmp_path}/prompts.txt", "run.timing=off", "run.progress=false",
        "run.mode=generate", f"run.store_dir={tmp_path}/store",
    )
    rec = json.loads(run(cfg, tmp_path / "out").read_text())
    assert rec["status"] == "ok"
    assert rec["cache"]["method"] == "tgate" and rec["cache"]["gate_step"] == 4
    assert rec["cache"]["gate_call"] == 3


@pytest.mark.integration
def test_run_py_refuses_an_unconditional_model():
    p = run_py("cache=tgate", "run.timing=off")
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "cache=tgate" in lines[0], p.stderr


def test_example_noop_and_other_values(unet):
    example = TGate(**TGate.example_knobs)
    assert example.enabled and set(TGate.other_values) == set(TGate.example_knobs)
    plain = _plain(unet)
    _, base, _, _ = _run(unet, example)
    assert not torch.equal(base[-1], plain[-1])
    for knob, v in TGate.other_values.items():
        _, outs, _, _ = _run(unet, TGate(**{**TGate.example_knobs, knob: v}))
        assert not torch.equal(outs[-1], base[-1]), knob
    assert not TGate(**{**TGate.example_knobs, **TGate.noop_knobs}).enabled
