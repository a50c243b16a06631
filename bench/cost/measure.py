"""Cost of a cached sampling run: MACs per call (two conventions) and throughput.

MACs (``docs/conventions.md`` §3): counted once per kind of call of the caching method's
plan (:mod:`bench.caching.method`; DeepCache: one full call, one retrieval call at the
configured branch) on a meta-device copy of the U-Net (no weights, no compute), per
image, without doubling for classifier-free guidance (a guided call is counted on its
two halves and halved, so a method that runs one half only counts as half), then averaged
over the run's plan (:mod:`bench.cost.macs`).

Throughput (:mod:`bench.cost.timing`: alternating rounds, per-arm minimum, bootstrap
interval, rounds added until the speed-up is known to ``run.timing_precision``),
two methods (``run.timing``):

* ``loop``: whole denoising loops (U-Net + scheduler; no VAE, text encoder or
  image I/O), baseline and cached. This is the paper's measurement.
* ``calls``: one full call, of each other kind of call as many as last as long as one
  full call, and one scheduler-only loop per round; a loop's time is composed from the
  plan, ``sum over kinds of n_kind * t_kind + t_scheduler`` (DeepCache:
  ``n_full * t_full + n_retrieval * t_retrieval + t_scheduler``). Its rounds
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
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from bench.caching.method import FULL, Caching, uncached
from bench.core.options import Timing, value
from bench.cost import macs, timing
from bench.models.loading import LoadedModel, ModelSpec, random_context
from bench.sampling import loop as sampling
from bench.sampling.generate import random_inputs
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


def call_macs(loaded: LoadedModel, model: ModelSpec, caching: Caching) -> dict[str, macs.MacCount]:
    """MACs of one call of each kind of the plan for one image (no CFG doubling), and of
    the uncached call (``full``).

    Counted on a meta-device copy built from the U-Net's config, so they depend only on
    the architecture, the conditioning's shape and the method: a sweep counts each once.
    """
    unet = loaded.unet
    config = json.dumps(dict(unet.config), sort_keys=True, default=str)
    kinds = tuple(caching.plan.distinct()) if caching.enabled else (FULL,)
    method = caching.method if caching.enabled else None
    arch = (type(unet), config, tuple(loaded.sample_shape), model.conditioning, int(model.context_tokens))
    key = (*arch, None if method is None else method.macs_key(), kinds, caching.target)
    if key not in _MACS:
        if len(_MACS) >= 64:
            _MACS.pop(next(iter(_MACS)))
        _MACS[key] = _call_macs(*arch, method, caching.plan, caching.target, kinds)
    return dict(_MACS[key])


_MACS: dict[tuple, tuple[tuple[str, macs.MacCount], ...]] = {}  # a sweep counts each (architecture, kinds' cost) once


def _call_macs(cls: type, config: str, sample_shape: tuple[int, ...], conditioning: str, context_tokens: int,
               method: Any, plan: Any, target: Any, kinds: tuple[str, ...]) -> tuple[tuple[str, macs.MacCount], ...]:
    with torch.device("meta"):
        meta = cls.from_config(json.loads(config))
    halves = 2 if target.guided else 1  # a guided call carries both halves of one image
    x = torch.empty(halves, *sample_shape, device="meta")
    t = torch.tensor([500], device="meta")
    kwargs = {k: v.to("meta") for k, v in random_context(conditioning, context_tokens, meta, halves, seed=0).items()}
    out = {FULL: macs.count_macs(meta, x, t, **kwargs) / halves}
    if method is not None:
        with method.attach(meta, plan, target) as session:
            for kind in kinds:  # the first kind fills what the others read
                session.force(kind)
                out[kind] = macs.count_macs(meta, x, t, **kwargs) / halves
            if session.executed != list(kinds):
                raise RuntimeError(f"MACs: forced kinds {list(kinds)} ran as {session.executed}")
    return tuple(out.items())


@dataclass(frozen=True)
class Baseline:
    """The uncached reference of a run: the same sampler, at ``run.baseline_steps`` steps when
    set (e.g. "speed vs PLMS-50"), else at the run's own steps."""

    sampler: SamplerSpec  # the run's sampler, at the baseline's steps
    num_calls: int
    is_run: bool  # the run itself is that uncached reference


def baseline_for(sampler: SamplerSpec, baseline_steps: int | None, loaded: LoadedModel, enabled: bool,
                 num_calls: int) -> Baseline:
    """``enabled``: whether the run's caching changes anything (else the run is its own baseline)."""
    if baseline_steps is None or baseline_steps == sampler.steps:
        return Baseline(sampler, num_calls, not enabled)
    other = dataclasses.replace(sampler, steps=baseline_steps)
    calls = sampling.num_model_calls(sampling.build_scheduler(other, loaded.scheduler_config))
    return Baseline(other, calls, False)


def macs_record(
    loaded: LoadedModel, model: ModelSpec, caching: Caching, baseline_calls: int | None = None,
) -> dict[str, float]:
    """MACs in G per image and model call: averaged over the run, and of one uncached call
    (``macs_full_g``) and one call of each kind the plan names as a column (DeepCache's
    ``macs_retrieval_g``); the whole run's MACs per image; the speed-up they predict against
    an uncached run of ``baseline_calls`` calls (default: as many as this run)."""
    per_kind = call_macs(loaded, model, caching)
    plan = caching.plan
    num_calls = plan.num_calls
    kinds = plan.kinds if caching.enabled else (FULL,) * num_calls
    avg = macs.plan_average(per_kind, kinds)
    full = per_kind[FULL]
    baseline_calls = num_calls if baseline_calls is None else baseline_calls
    record = {"macs_g": avg.paper / 1e9, "macs_all_g": avg.all / 1e9, "macs_full_g": full.paper / 1e9}
    for kind in plan.columns:
        if kind != FULL and kind in per_kind:
            record[f"macs_{kind}_g"] = per_kind[kind].paper / 1e9
    record.update({
        "macs_full_all_g": full.all / 1e9,
        "macs_run_g": avg.paper * num_calls / 1e9,
        "macs_predicted_speedup": float(baseline_calls * full.paper / (num_calls * avg.paper)),
    })
    return record


MACS_CONVENTION = (
    "G per image, per model call, averaged over the run; no CFG doubling; "
    "macs = conv + linear (paper), macs_all = + attention matmuls"
)


def _noise(loaded: LoadedModel, seed: int, batch: int) -> tuple[list[torch.Generator], torch.Tensor]:
    p = next(loaded.unet.parameters())
    gens = sampling.sample_generators(seed, range(batch))
    return gens, sampling.initial_noise(gens, loaded.sample_shape, p.device, p.dtype)


def _model_inputs(noise: torch.Tensor, cond: dict, uncond: dict | None) -> tuple[torch.Tensor, dict]:
    """The U-Net's input of one call: with guidance, the unconditional and conditional halves as one batch."""
    if uncond is None:
        return noise, cond
    return torch.cat([noise, noise]), {k: torch.cat([uncond[k], cond[k]]) for k in cond}


def loop_fn(loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, caching: Caching, batch: int,
            seed: int = 0) -> Callable[[], torch.Tensor]:
    """One whole denoising loop of ``batch`` samples with ``caching`` attached; inputs prepared outside."""
    unet = loaded.unet
    gens, noise, cond, uncond = random_inputs(loaded, model, seed, batch)

    def run() -> torch.Tensor:
        scheduler = sampling.build_scheduler(sampler, loaded.scheduler_config)
        with torch.inference_mode(), caching.attach(unet):
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
    gens, noise, cond, uncond = random_inputs(loaded, model, spec.seed, spec.batch_size)
    x, kwargs = _model_inputs(noise, cond, uncond)
    t = torch.tensor(500, device=noise.device)
    with torch.inference_mode():
        loaded.unet(x, t, **kwargs)  # warm-up
        t0 = time.perf_counter()
        loaded.unet(x, t, **kwargs)
        estimate = num_calls * (time.perf_counter() - t0)
    return Timing.loop.value if estimate <= spec.loop_max_s else Timing.calls.value


def loop_times(counts: dict[str, int], baseline_calls: int) -> Callable[[dict], tuple[Any, Any]]:
    """``calls`` composition: per-call times -> (baseline loop, cached loop). The cached loop
    makes ``counts[kind]`` calls of each kind (arm ``<kind>_call``); the baseline makes
    ``baseline_calls`` full calls, with its own scheduler loop when timed (arm
    ``scheduler_baseline``)."""

    def compose(t: dict) -> tuple[Any, Any]:
        sched = t["scheduler"]
        base = baseline_calls * t[f"{FULL}_call"] + t.get("scheduler_baseline", sched)
        cached = sched
        for kind, n in counts.items():
            cached = n * t[f"{kind}_call"] + cached
        return base, cached

    return compose


def timing_record(
    loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, spec: TimingSpec, caching: Caching,
    baseline: Baseline | None = None, *,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Throughput of the baseline and the cached loop, the speed-up with its interval (the
    table's measurements), and the timing's details (rounds, raw times, machine load)."""
    b = baseline or baseline_for(sampler, None, loaded, caching.enabled, caching.plan.num_calls)
    with timing_threads(spec):
        return _timing_record(loaded, model, sampler, spec, caching, b, timer)


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
    loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, spec: TimingSpec, caching: Caching,
    b: Baseline, timer: Callable[[], float],
) -> tuple[dict[str, Any], dict[str, Any]]:
    method = resolve_method(loaded, model, spec, b.num_calls)
    batch, seed = spec.batch_size, spec.seed
    common = dict(
        warmup=spec.warmup, min_rounds=spec.repeats, precision=spec.precision,
        budget_s=spec.budget_s, device=spec.device, timer=timer,
    )
    repeats: dict[str, int] = {}  # arm -> runs per timed region (calls)
    if method == Timing.loop:
        base = uncached(b.num_calls, caching.target)
        arms = {"baseline": loop_fn(loaded, model, b.sampler, base, batch, seed)}
        if not b.is_run:
            arms["cached"] = loop_fn(loaded, model, sampler, caching, batch, seed)
        run_arm = "baseline" if b.is_run else "cached"
        result = timing.time_ratio(arms, lambda t: (t["baseline"], t[run_arm]), **common)
    elif method == Timing.calls:
        counts = caching.plan.counts() if caching.enabled else {FULL: caching.plan.num_calls}
        with torch.inference_mode(), caching.attach(loaded.unet) as session:
            arms = _call_variants(loaded, model, sampler, session, list(counts), batch, seed)
            if b.sampler != sampler:  # a baseline at other steps: its own scheduler loop
                arms["scheduler_baseline"] = _scheduler_only(loaded, b.sampler, batch, seed)
            for kind in counts:
                if kind != FULL:
                    repeats[f"{kind}_call"] = _equal_length_repeats(arms[f"{FULL}_call"], arms[f"{kind}_call"],
                                                                    timer)
            result = timing.time_ratio(arms, loop_times(counts, b.num_calls), repeats=repeats, **common)
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
    full: Callable[[], Any], other: Callable[[], Any], timer: Callable[[], float] = time.perf_counter,
    cap: int = 100,
) -> int:
    """How many calls of another kind last as long as one full call (at least 1, at most ``cap``).

    The ``calls`` method times that many calls as one region: on a busy machine a
    1 ms region often runs uninterrupted and a 10 ms one rarely, so timed one by one the
    short call's minimum would shrink more than the full call's and inflate the
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

    full()  # the other kind reads what a full call stored
    t_full, t_other = best(full), best(other)
    return max(1, min(cap, round(t_full / max(t_other, 1e-9))))


def _call_variants(loaded: LoadedModel, model: ModelSpec, sampler: SamplerSpec, session: Any, kinds: list[str],
                   batch: int, seed: int = 0) -> dict[str, Callable]:
    """Callables timing one call of each kind (``<kind>_call``, the method attached and the
    kind forced; ``full_call`` always) and one scheduler-only loop. A call of another kind
    reads what the last call of the plan's first kind stored, which the timing runs first."""
    unet = loaded.unet
    _, noise, cond, uncond = random_inputs(loaded, model, seed, batch)
    x, kwargs = _model_inputs(noise, cond, uncond)
    t = torch.tensor(500, device=noise.device)

    def call_of(kind: str) -> Callable[[], None]:
        def call() -> None:
            session.force(kind)
            unet(x, t, **kwargs)
        return call

    arms = {f"{k}_call": call_of(k) for k in dict.fromkeys([FULL, *kinds])}
    arms["scheduler"] = _scheduler_only(loaded, sampler, batch, seed)
    return arms


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
