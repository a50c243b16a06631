"""bench/timing.py and the run-level timing (bench/measure.py), mostly on a fake clock."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.caching.method import apply
from bench.cost import measure
from bench.models import loading as models
from bench.cost import timing
from bench.caching.schedules import uniform_full_calls
from harness import compose_cfg
from bench.run.parts import cache_settings, model_spec, sampler_spec, timing_spec


class FakeClock:
    """A timer that only moves when an arm "runs": each arm advances it by its next duration."""

    def __init__(self):
        self.t = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.t

    def arm(self, name: str, durations):
        it = iter(durations) if not callable(durations) else None

        def run():
            self.log.append(name)
            self.t += durations() if it is None else next(it)

        return run


def loop_ratio(t):
    return t["baseline"], t["cached"]


def test_warmup_is_not_timed_and_rounds_alternate():
    clock = FakeClock()
    arms = {"baseline": clock.arm("baseline", lambda: 4.0), "cached": clock.arm("cached", lambda: 1.0)}
    res = timing.time_ratio(arms, loop_ratio, warmup=2, min_rounds=4, timer=clock)
    assert clock.log == ["baseline", "cached"] * 2 + ["baseline", "cached", "cached", "baseline"] * 2
    assert res.rounds == 4 and res.warmup == 2
    assert res.times_s == {"baseline": [4.0] * 4, "cached": [1.0] * 4}
    # constant times: the interval has no width, so the minimum number of rounds is enough
    assert res.estimate.value == res.estimate.low == res.estimate.high == 4.0
    assert res.reliable
    assert res.warning is None or "uncertain" not in res.warning  # a busy test machine may add a load warning


def test_repeats_time_several_runs_as_one_region_and_record_the_time_per_run():
    clock = FakeClock()
    arms = {"baseline": clock.arm("baseline", lambda: 4.0), "cached": clock.arm("cached", iter([1.0, 3.0] * 8))}
    res = timing.time_ratio(arms, loop_ratio, warmup=0, min_rounds=2, timer=clock, repeats={"cached": 2})
    assert clock.log == ["baseline", "cached", "cached", "cached", "cached", "baseline"]
    assert res.times_s == {"baseline": [4.0, 4.0], "cached": [2.0, 2.0]} and res.estimate.value == 2.0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timing.time_ratio(arms, loop_ratio, timer=clock, repeats={"cached": 0})


def test_minimum_ignores_time_added_by_other_processes():
    """One-sided noise (other processes only add time): the per-arm minimum recovers the true
    ratio exactly where the median does not."""
    rng = np.random.default_rng(0)

    def noisy(base):  # 60 % of runs slowed by 1x-20x: more than the median can ignore
        return lambda: base * (1 + (rng.random() < 0.6) * rng.uniform(1, 20))

    clock = FakeClock()
    arms = {"baseline": clock.arm("baseline", noisy(3.0)), "cached": clock.arm("cached", noisy(1.0))}
    res = timing.time_ratio(arms, loop_ratio, min_rounds=30, precision=0.01, budget_s=1e9, timer=clock)
    assert res.estimate.value == pytest.approx(3.0)
    assert res.numerator_s == pytest.approx(3.0) and res.denominator_s == pytest.approx(1.0)
    med = res.arm_median_s
    assert abs(med["baseline"] / med["cached"] - 3.0) > 0.03  # the ratio of medians is biased here
    assert res.estimate.low <= 3.0 <= res.estimate.high


def test_rounds_are_added_until_precise_then_stop():
    # the cached arm is undisturbed only from round 20 on; before, its times spread widely
    clock = FakeClock()
    n, rng = {"c": 0}, np.random.default_rng(2)

    def cached():
        n["c"] += 1
        return 1.0 if n["c"] > 20 else rng.uniform(1.2, 3.0)

    arms = {"baseline": clock.arm("baseline", lambda: 2.0), "cached": clock.arm("cached", cached)}
    res = timing.time_ratio(arms, loop_ratio, warmup=0, min_rounds=5, precision=0.02, budget_s=1e9, timer=clock)
    assert res.rounds > 20
    assert res.estimate.value == pytest.approx(2.0)
    assert res.reliable and res.estimate.rel_halfwidth <= 0.02


def test_budget_stops_an_imprecise_timing_and_flags_it():
    rng = np.random.default_rng(1)
    clock = FakeClock()
    arms = {
        "baseline": clock.arm("baseline", lambda: rng.uniform(1, 10)),
        "cached": clock.arm("cached", lambda: rng.uniform(1, 10)),
    }
    res = timing.time_ratio(arms, loop_ratio, warmup=0, min_rounds=3, precision=0.001, budget_s=100.0, timer=clock)
    assert res.elapsed_s >= 100.0 and res.rounds < 100
    assert not res.reliable
    assert "uncertain" in res.warning and "target ±0.1%" in res.warning


def test_min_rounds_is_validated():
    with pytest.raises(ValueError, match="min_rounds"):
        timing.time_ratio({"a": lambda: None}, lambda t: (t["a"], t["a"]), min_rounds=1)


def test_cuda_is_synchronised_around_each_timed_region(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append("sync"))
    clock = FakeClock()

    def run():
        events.append("run")
        clock.t += 1.0

    res = timing.time_ratio({"a": run}, lambda t: (t["a"], t["a"]), warmup=1, min_rounds=2, device="cuda",
                            timer=clock)
    assert events == ["run", "sync"] + ["sync", "run", "sync"] * 2
    assert res.times_s == {"a": [1.0, 1.0]}


def test_cpu_meter_sees_another_process():
    if timing.CpuMeter().stop() is None:
        pytest.skip("no /proc/stat here")
    meter = timing.CpuMeter()
    hog = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"])
    hog.wait()
    load = meter.stop()
    # one busy process on this machine's CPUs: a share of at least ~1/ncpu, allowing for the start-up
    assert 0.5 / (torch.multiprocessing.cpu_count()) < load <= 1.0


# --------------------------------------------------------------------------------------- run level


@pytest.fixture(scope="module")
def digits():
    cfg = compose_cfg("sampler.steps=100", "run.timing_warmup=0", "run.timing_repeats=3", "cache.interval=5")
    return cfg, models.load_model(model_spec(cfg.model))


def _timed(loaded, cfg, settings, plan, calls, **kw):
    """``measure.timing_record`` with the parts of ``cfg`` the runner would pass."""
    caching = apply(settings, loaded.unet, calls)
    assert caching.plan.full_calls == list(plan)
    return measure.timing_record(loaded, model_spec(cfg.model), sampler_spec(cfg.sampler), timing_spec(cfg.run),
                                 caching, **kw)


def _fake_arms(clock, durations):
    return lambda *a, **k: {name: clock.arm(name, lambda d=d: d) for name, d in durations.items()}


def test_calls_timing_composes_the_loop_from_the_schedule(digits, monkeypatch):
    """Baseline loop = T full calls + the scheduler; cached loop = n_full full calls + the
    rest retrieval calls + the scheduler (T = 100, uniform 1:5: 20 full calls)."""
    cfg, loaded = digits
    cfg.run.timing = "calls"
    clock = FakeClock()
    monkeypatch.setattr(measure, "_call_variants",
                        _fake_arms(clock, {"full_call": 10.0, "retrieval_call": 1.0, "scheduler": 5.0}))
    settings = cache_settings(cfg.cache, cfg.model)
    plan = uniform_full_calls(100, 5)
    m, details = _timed(loaded, cfg, settings, plan, 100, timer=clock)
    base, cached = 100 * 10.0 + 5.0, 20 * 10.0 + 80 * 1.0 + 5.0
    assert details["baseline_s"] == base and details["cached_s"] == cached
    assert m["speedup"] == pytest.approx(base / cached)
    assert m["throughput"] == pytest.approx(1 / cached) and m["throughput_baseline"] == pytest.approx(1 / base)
    assert m["timing_method"] == "calls" and m["timing_reliable"] is True
    assert m["speedup_low"] == m["speedup_high"] == m["speedup"]  # constant fake times
    # ten retrieval calls last as long as one full call: they are timed as one region
    assert details["repeats"] == {"retrieval_call": 10} and details["raw_s"]["retrieval_call"][0] == 1.0


def test_loop_timing_ratio(digits, monkeypatch):
    cfg, loaded = digits
    cfg.run.timing = "loop"
    clock = FakeClock()
    fns = {}

    def fake_loop_fn(loaded, model, sampler, caching, batch, seed=0):
        name = "cached" if caching.enabled else "baseline"
        fns[name] = clock.arm(name, lambda: 6.0 if name == "baseline" else 2.0)
        return fns[name]

    monkeypatch.setattr(measure, "loop_fn", fake_loop_fn)
    settings = cache_settings(cfg.cache, cfg.model)
    m, details = _timed(loaded, cfg, settings, uniform_full_calls(100, 5), 100, timer=clock)
    assert m["speedup"] == 3.0 and m["throughput"] == 0.5 and details["rounds"] == 3


def test_auto_picks_calls_for_long_loops_and_loop_for_short_ones(digits):
    cfg, loaded = digits
    cfg.run.timing = "auto"
    cfg.run.timing_loop_max_s = 0.0
    assert measure.resolve_method(loaded, model_spec(cfg.model), timing_spec(cfg.run), 100) == "calls"
    cfg.run.timing_loop_max_s = 1e9
    assert measure.resolve_method(loaded, model_spec(cfg.model), timing_spec(cfg.run), 100) == "loop"
    cfg.run.timing = "calls"
    assert measure.resolve_method(loaded, model_spec(cfg.model), timing_spec(cfg.run), 100) == "calls"


def test_real_calls_timing_on_the_digits_model(digits):
    """The real arms: a retrieval call is cheaper than a full call, and both arms are timed."""
    cfg, loaded = digits
    cfg.run.timing = "calls"
    cfg.run.timing_budget_s = 2.0
    settings = cache_settings(cfg.cache, cfg.model)
    m, details = _timed(loaded, cfg, settings, uniform_full_calls(100, 5), 100)
    assert details["rounds"] >= 3 and set(details["raw_s"]) == {"full_call", "retrieval_call", "scheduler"}
    assert details["min_s"]["retrieval_call"] < details["min_s"]["full_call"]
    assert m["speedup"] > 1 and m["speedup_low"] <= m["speedup"] <= m["speedup_high"]


@pytest.mark.integration
@pytest.mark.parametrize("timing_threads,expect", [(1, 1), (2, 2), (None, 3)])
def test_cpu_timing_runs_with_timing_threads_and_restores_them(digits, timing_threads, expect):
    """``run.timing_threads`` (default 1; null: ``run.threads``) while timing, torch's own count after."""
    cfg, loaded = digits
    cfg = cfg.copy()
    cfg.run.timing, cfg.run.timing_budget_s = "calls", 0.0
    cfg.run.timing_threads, cfg.run.threads = timing_threads, 3
    settings = cache_settings(cfg.cache, cfg.model)
    before = torch.get_num_threads()
    _, details = _timed(loaded, cfg, settings, uniform_full_calls(100, 5), 100)
    assert details["threads"] == expect and torch.get_num_threads() == before


def test_timing_threads_must_be_positive(digits):
    from bench.core.errors import HarnessError
    from bench.run.validate import run_settings

    cfg = digits[0].copy()
    cfg.run.timing_threads = 0
    with pytest.raises(HarnessError, match=r"run.timing_threads=0 must be >= 1, or null for run.threads"):
        run_settings(cfg.run)


def test_every_timed_full_call_runs_the_whole_unet(digits, monkeypatch):
    """Each call of the ``full_call`` arm runs the mid block (the deepest part of the U-Net)
    exactly once, whatever ran before it -- also right after another full call, as the timing
    runs them (warm-up, equal-length probe, rounds) -- and a retrieval call never runs it: else
    the composed loop times retrievals as full calls and the speed-up shrinks (3.49x -> 1.14x)."""
    cfg, loaded = digits
    cfg = cfg.copy()
    cfg.run.timing, cfg.run.timing_budget_s, cfg.run.timing_repeats = "calls", 0.0, 2
    deep = []
    hook = loaded.unet.mid_block.register_forward_hook(lambda *a: deep.append(1))
    per_arm: dict[str, list[int]] = {"full_call": [], "retrieval_call": []}
    variants = measure._call_variants

    def counting(*args, **kwargs):
        arms = variants(*args, **kwargs)

        def counted(name, fn):
            def run():
                before = len(deep)
                fn()
                per_arm[name].append(len(deep) - before)
            return run

        return {k: counted(k, fn) if k in per_arm else fn for k, fn in arms.items()}

    monkeypatch.setattr(measure, "_call_variants", counting)
    settings = cache_settings(cfg.cache, cfg.model)
    try:
        _timed(loaded, cfg, settings, uniform_full_calls(100, 5), 100)
    finally:
        hook.remove()
    assert len(per_arm["full_call"]) >= 4 and set(per_arm["full_call"]) == {1}, per_arm["full_call"]
    assert per_arm["retrieval_call"] and set(per_arm["retrieval_call"]) == {0}, per_arm["retrieval_call"]
