"""Cost of a cached sampling run: MACs per call (two conventions) and throughput.

MACs (``docs/conventions.md`` §3): counted once per kind of call -- one full call,
one retrieval call at the configured branch -- on a meta-device copy of the U-Net
(no weights, no compute), per image, without doubling for classifier-free guidance,
then averaged over the run's schedule of full calls (:mod:`bench.cost.macs`).

Throughput (:mod:`bench.cost.timing`: alternating rounds, per-arm minimum, bootstrap
interval, rounds added until the speed-up is known to ``run.timing_precision``),
two methods (``run.timing``):

* ``loop``: whole denoising loops (U-Net + scheduler; no VAE, text encoder or
  image I/O), baseline and cached. This is the paper's measurement.
* ``calls``: one full call, as many retrieval calls as last as long as one full
  call, and one scheduler-only loop per round; a loop's time is composed from the
  schedule, ``n_full * t_full + n_retrieval * t_retrieval + t_scheduler``. Its rounds
  take milliseconds, so both arms see the same load and a busy machine leaves many
  undisturbed rounds for the minimum; its regions are of about equal length, so they
  are equally likely to be interrupted.
* ``auto`` (default): ``loop`` on CUDA, and on a CPU when one baseline loop takes
  at most ``run.timing_loop_max_s``; ``calls`` otherwise.

On a CPU the timing runs with ``run.timing_threads`` torch threads (default 1). An
op split over several threads finishes when its last thread does; on a busy machine
a short call often runs with all its threads scheduled and a long one rarely, so
their minima shrink unequally and the speed-up drifts with the load (measured: a
digits U-Net beside two busy loops, 2 cores, full call 10.1 -> 24 ms at
2 threads, 10.1 -> 11.5 ms at 1; docs/timing.md, "Numbers on a busy machine").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from bench.caching.engine import CacheSettings, deepcache
from bench.core.options import Schedule, Timing, value
from bench.cost import macs, timing
from bench.models.loading import LoadedModel, ModelSpec, random_context
from bench.sampling import loop as sampling
from bench.sampling.loop import SamplerSpec


@dataclass(frozen=True)
class TimingSpec:
    """How throughput is measured (``run.timing*``; see the module docstring)."""

    method: str = Timing.auto.value  # auto | loop | calls | off
    batch_size: int = 1
    repeats: int = 5  # rounds at least
    warmup: int = 1
    precision: float = 0.05  # target relative half-width of the speed-up's 95 % interval
    budget_s: float = 30.0
    loop_max_s: float = 0.5  # auto on a CPU: whole loops only when one takes at most this
    threads: int | None = 1  # torch threads while timing on a CPU (None: leave torch's count)
    device: str = "cpu"
    seed: int = 0  # of the timed inputs (noise, random conditioning)


def call_macs(loaded: LoadedModel, model: ModelSpec, settings: CacheSettings) -> tuple[macs.MacCount, macs.MacCount]:
    """MACs of one full and one retrieval call for one image (batch 1, no CFG doubling).

    Counted on a meta-device copy built from the U-Net's config, so they depend only on
    the architecture, the conditioning's shape and the branch: a sweep counts each once.
    """
    unet = loaded.unet
    config = json.dumps(dict(unet.config), sort_keys=True, default=str)
    return _call_macs(type(unet), config, tuple(loaded.sample_shape), model.conditioning,
                      int(model.context_tokens), int(settings.branch))


@functools.lru_cache(maxsize=64)
def _call_macs(cls: type, config: str, sample_shape: tuple[int, ...], conditioning: str, context_tokens: int,
               branch: int) -> tuple[macs.MacCount, macs.MacCount]:
    with torch.device("meta"):
        meta = cls.from_config(json.loads(config))
    x = torch.empty(1, *sample_shape, device="meta")
    t = torch.tensor([500], device="meta")
    kwargs = {k: v.to("meta") for k, v in random_context(conditioning, context_tokens, meta, 1, seed=0).items()}
    probe = CacheSettings(interval=2, branch=branch)
    with deepcache(meta, probe) as state:
        full = macs.count_macs(meta, x, t, **kwargs)
        retrieval = macs.count_macs(meta, x, t, **kwargs)
    assert state.full_calls == [0] and state.retrieval_calls == 1
    return full, retrieval


@dataclass(frozen=True)
class Baseline:
    """The uncached reference of a run: the same sampler, at ``run.baseline_steps`` steps when
    set (e.g. "speed vs PLMS-50"), else at the run's own steps."""

    sampler: SamplerSpec  # the run's sampler, at the baseline's steps
    num_calls: int
    is_run: bool  # the run itself is that uncached reference


def baseline_for(sampler: SamplerSpec, baseline_steps: int | None, loaded: LoadedModel, settings: CacheSettings,
                 num_calls: int) -> Baseline:
    if baseline_steps is None or baseline_steps == sampler.steps:
        return Baseline(sampler, num_calls, not settings.enabled)
    other = dataclasses.replace(sampler, steps=baseline_steps)
    calls = sampling.num_model_calls(sampling.build_scheduler(other, loaded.scheduler_config))
    return Baseline(other, calls, False)


def macs_record(
    loaded: LoadedModel, model: ModelSpec, settings: CacheSettings, full_calls: list[int], num_calls: int,
    baseline_calls: int | None = None,
) -> dict[str, float]:
    """MACs in G per image and model call: averaged over the run, and of one full / retrieval
    call; the whole run's MACs per image; the speed-up they predict against an uncached run of
    ``baseline_calls`` calls (default: as many as this run)."""
    full, retrieval = call_macs(loaded, model, settings)
    avg = macs.average_macs(full, retrieval, full_calls, num_calls)
    baseline_calls = num_calls if baseline_calls is None else baseline_calls
    return {
        "macs_g": avg.paper / 1e9,
        "macs_all_g": avg.all / 1e9,
        "macs_full_g": full.paper / 1e9,
        "macs_retrieval_g": retrieval.paper / 1e9,
        "macs_full_all_g": full.all / 1e9,
        "macs_run_g": avg.paper * num_calls / 1e9,
        "macs_predicted_speedup": float(baseline_calls * full.paper / (num_calls * avg.paper)),
    }


MACS_CONVENTION = (
    "G per image, per model call, averaged over the run; no CFG doubling; "
    "macs = conv + linear (paper), macs_all = + attention matmuls"
)


def _noise(loaded: LoadedModel, seed: int, batch: int) -> tuple[list[torch.Generator], torch.Tensor]:
    p = next(loaded.unet.parameters())
    gens = sampling.sample_generators(seed, range(batch))
    return gens, sampling.initial_noise(gens, loaded.sample_shape, p.device, p.dtype)


def _inputs(loaded: LoadedModel, model: ModelSpec, seed: int, batch: int):
    unet = loaded.unet
    gens, noise = _noise(loaded, seed, batch)
    cond = random_context(model.conditioning, model.context_tokens, unet, batch, seed=seed)
    uncond = None
    if cond and model.guidance_scale > 1:
        uncond = random_context(model.conditioning, model.context_tokens, unet, batch, seed=seed + 1)
    return gens, noise, cond, uncond


def _model_inputs(noise: torch.Tensor, cond: dict, uncond: dict | None) -> tuple[torch.Tensor, dict]:
    """The U-Net's input of one call: with guidance, the unconditional and conditional halves as one batch."""
    if uncond is None:
        return noise, cond
    return torch.cat([noise, noise]), {k: torch.cat([uncond[k], cond[k]]) for k in cond}


def loop_fn(loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, settings: CacheSettings, batch: int,
            seed: int = 0) -> Callable[[], torch.Tensor]:
    """One whole denoising loop of ``batch`` samples; inputs prepared outside."""
    unet = loaded.unet
    gens, noise, cond, uncond = _inputs(loaded, model, seed, batch)

    def run() -> torch.Tensor:
        scheduler = sampling.build_scheduler(sampler, loaded.scheduler_config)
        calls = sampling.num_model_calls(scheduler)
        with torch.inference_mode(), deepcache(unet, settings, num_calls=calls):
            return sampling.denoise(
                unet, scheduler, noise, cond=cond, uncond=uncond, guidance_scale=model.guidance_scale,
                generators=gens, eta=sampler.eta,
            )

    return run


def resolve_method(loaded: LoadedModel, model: ModelSpec, spec: TimingSpec, num_calls: int) -> str:
    """``run.timing`` with ``auto`` resolved (see the module docstring)."""
    method = value(spec.method)
    if method != Timing.auto:
        return method
    if torch.device(spec.device).type == "cuda":
        return Timing.loop.value
    gens, noise, cond, uncond = _inputs(loaded, model, spec.seed, spec.batch_size)
    x, kwargs = _model_inputs(noise, cond, uncond)
    t = torch.tensor(500, device=noise.device)
    with torch.inference_mode():
        loaded.unet(x, t, **kwargs)  # warm-up
        t0 = time.perf_counter()
        loaded.unet(x, t, **kwargs)
        estimate = num_calls * (time.perf_counter() - t0)
    return Timing.loop.value if estimate <= spec.loop_max_s else Timing.calls.value


def loop_times(num_calls: int, n_full: int, baseline_calls: int | None = None) -> Callable[[dict], tuple[Any, Any]]:
    """``calls`` composition: per-call times -> (baseline loop, cached loop). The baseline makes
    ``baseline_calls`` full calls (default ``num_calls``) with its own scheduler loop when timed
    (arm ``scheduler_baseline``)."""
    baseline_calls = num_calls if baseline_calls is None else baseline_calls

    def compose(t: dict) -> tuple[Any, Any]:
        full, retr, sched = t["full_call"], t["retrieval_call"], t["scheduler"]
        base = baseline_calls * full + t.get("scheduler_baseline", sched)
        return base, n_full * full + (num_calls - n_full) * retr + sched

    return compose


def timing_record(
    loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, spec: TimingSpec, settings: CacheSettings,
    full_calls: list[int], num_calls: int, baseline: Baseline | None = None, *,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Throughput of the baseline and the cached loop, the speed-up with its interval (the
    table's measurements), and the timing's details (rounds, raw times, machine load)."""
    b = baseline or baseline_for(sampler, None, loaded, settings, num_calls)
    with timing_threads(spec):
        return _timing_record(loaded, model, sampler, spec, settings, full_calls, num_calls, b, timer)


@contextlib.contextmanager
def timing_threads(spec: TimingSpec) -> Iterator[None]:
    """torch's intra-op threads set to ``spec.threads`` on a CPU while timing, restored after."""
    n = spec.threads
    if not n or torch.device(spec.device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timing_record(
    loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, spec: TimingSpec, settings: CacheSettings,
    full_calls: list[int], num_calls: int, b: Baseline, timer: Callable[[], float],
) -> tuple[dict[str, Any], dict[str, Any]]:
    method = resolve_method(loaded, model, spec, b.num_calls)
    batch, seed = spec.batch_size, spec.seed
    common = dict(
        warmup=spec.warmup, min_rounds=spec.repeats, precision=spec.precision,
        budget_s=spec.budget_s, device=spec.device, timer=timer,
    )
    repeats: dict[str, int] = {}  # arm -> runs per timed region (calls)
    if method == Timing.loop:
        uncached = CacheSettings(interval=1, branch=settings.branch, schedule=Schedule.none.value)
        arms = {"baseline": loop_fn(loaded, model, b.sampler, uncached, batch, seed)}
        if not b.is_run:
            arms["cached"] = loop_fn(loaded, model, sampler, settings, batch, seed)
        run_arm = "baseline" if b.is_run else "cached"
        result = timing.time_ratio(arms, lambda t: (t["baseline"], t[run_arm]), **common)
    elif method == Timing.calls:
        probe = CacheSettings(interval=2, branch=settings.branch)
        with torch.inference_mode(), deepcache(loaded.unet, probe) as state:
            arms = _call_variants(loaded, model, sampler, state, batch, seed)
            if b.sampler != sampler:  # a baseline at other steps: its own scheduler loop
                arms["scheduler_baseline"] = _scheduler_only(loaded, b.sampler, batch, seed)
            repeats["retrieval_call"] = _equal_length_repeats(arms["full_call"], arms["retrieval_call"], timer)
            result = timing.time_ratio(arms, loop_times(num_calls, len(full_calls), b.num_calls), repeats=repeats,
                                       **common)
    else:
        raise ValueError(f"run.timing={method!r} is not one of {', '.join(Timing.names())}")
    if result.warning:
        print(f"warning: timing: {result.warning}", file=sys.stderr)
    est = result.estimate
    measurements = {
        "throughput": batch / result.denominator_s,
        "throughput_baseline": batch / result.numerator_s,
        "speedup": est.value,
        "speedup_low": est.low,
        "speedup_high": est.high,
        "speedup_pm": est.rel_halfwidth,
        "timing_reliable": result.reliable,
        "timing_method": method,
        "timing_batch_size": batch,
    }
    details = {
        "method": method,
        "estimator": "per-arm minimum over alternating rounds; speed-up interval: bootstrap over rounds",
        "confidence": est.confidence,
        "precision_target": result.precision,
        "rounds": result.rounds,
        "warmup": result.warmup,
        "elapsed_s": result.elapsed_s,
        "foreign_load": result.foreign_load,
        "warning": result.warning,
        "threads": torch.get_num_threads(),
        "baseline_s": result.numerator_s,
        "cached_s": result.denominator_s,
        "min_s": result.arm_min_s,
        "median_s": result.arm_median_s,
        "raw_s": {k: [round(x, 7) for x in v] for k, v in result.times_s.items()},
    }
    if repeats:
        details["repeats"] = repeats
    return measurements, details


def _equal_length_repeats(
    full: Callable[[], Any], retrieval: Callable[[], Any], timer: Callable[[], float] = time.perf_counter,
    cap: int = 100,
) -> int:
    """How many retrieval calls last as long as one full call (at least 1, at most ``cap``).

    The ``calls`` method times that many retrieval calls as one region: on a busy machine a
    1 ms region often runs uninterrupted and a 10 ms one rarely, so timed one by one the
    retrieval call's minimum would shrink more than the full call's and inflate the
    speed-up (docs/timing.md, "Numbers on a busy machine").
    """
    def best(fn: Callable[[], Any]) -> float:
        fn()  # warm
        out = float("inf")
        for _ in range(3):
            t0 = timer()
            fn()
            out = min(out, timer() - t0)
        return out

    full()  # the retrieval call reads what a full call stored
    t_full, t_retr = best(full), best(retrieval)
    return max(1, min(cap, round(t_full / max(t_retr, 1e-9))))


def _call_variants(loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, state: Any, batch: int,
                   seed: int = 0) -> dict[str, Callable]:
    """Callables timing one full call, one retrieval call (engine attached, uniform
    1:2 plan) and one scheduler-only loop."""
    unet = loaded.unet
    _, noise, cond, uncond = _inputs(loaded, model, seed, batch)
    x, kwargs = _model_inputs(noise, cond, uncond)
    t = torch.tensor(500, device=noise.device)

    def full_call():
        state.reset()  # call 0: full
        unet(x, t, **kwargs)

    def retrieval_call():
        if state.stored is None:
            raise RuntimeError("timing: a full call must fill the cache before a retrieval call")
        state.calls = 1  # call 1 of the 1:2 plan: retrieval, from what the last full call stored
        unet(x, t, **kwargs)

    return {"full_call": full_call, "retrieval_call": retrieval_call,
            "scheduler": _scheduler_only(loaded, sampler, batch, seed)}


def _scheduler_only(loaded: LoadedModel, sampler: SamplerSpec, batch: int, seed: int = 0) -> Callable[[], None]:
    """One sampling loop of ``sampler`` with a model that returns zeros: the scheduler's own time."""
    gens, noise = _noise(loaded, seed, batch)
    zero = _Zero(torch.zeros_like(noise))

    def scheduler_only():
        scheduler = sampling.build_scheduler(sampler, loaded.scheduler_config)
        sampling.denoise(lambda *a, **k: zero, scheduler, noise, generators=gens, eta=sampler.eta)

    return scheduler_only


class _Zero:
    """A model output of zeros, for timing the scheduler alone."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample
