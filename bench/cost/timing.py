"""Timing a cached sampling loop against its baseline, so that the speed-up survives a busy machine.

Protocol (``docs/conventions.md`` §4, throughput):

1. **Warm-up.** Every arm runs ``warmup`` times, untimed.
2. **Rounds.** In each round every arm runs once; the order alternates between
   rounds (A B, B A, A B, ...) so that slow drift of the machine's load reaches
   every arm alike. Each timed region is ``sync(); t0; fn(); sync(); t1`` with
   ``sync`` = ``torch.cuda.synchronize`` on CUDA.
3. **Estimator.** Other processes only ever *add* time to a measurement, so the
   minimum over the rounds is the estimator least affected by them (Chen & Revels,
   "Robust benchmarking in noisy environments", arXiv:1608.04295, 2016). Each arm's
   time is its minimum; the speed-up is the ratio of the composed loop times.
4. **Precision within a budget.** A bootstrap over whole rounds (which keeps the
   arms of a round together) gives a confidence interval of the speed-up. Rounds
   are added until the interval's half-width is within ``precision`` of the
   estimate, or until ``budget_s`` seconds of timing are spent.
5. **Trust.** A result whose interval is still wider than ``precision`` is marked
   ``reliable = False`` with a warning. The CPU time other processes used during
   the measurement (``foreign_load``, Linux ``/proc/stat``) is recorded and warned
   about: the minimum resists intermittent load, not a machine that is never idle.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

__all__ = ["Estimate", "Timing", "time_ratio", "CpuMeter", "make_sync"]

# above this share of the machine's CPU used by other processes, a timing carries a warning
BUSY_WARNING = 0.25

Compose = Callable[[Mapping[str, Any]], tuple[Any, Any]]


@dataclass(frozen=True)
class Estimate:
    """A ratio with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    confidence: float

    @property
    def rel_halfwidth(self) -> float:
        """Half the interval's width relative to the estimate (the table's ``±``)."""
        return (self.high - self.low) / 2 / self.value if self.value else float("inf")


@dataclass
class Timing:
    """Everything one :func:`time_ratio` measured."""

    times_s: dict[str, list[float]]  # per arm, in round order
    rounds: int
    warmup: int
    elapsed_s: float
    estimate: Estimate  # numerator time / denominator time (the speed-up)
    numerator_s: float  # composed from the per-arm minima
    denominator_s: float
    precision: float
    foreign_load: float | None
    reliable: bool = field(init=False)
    warning: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.reliable = self.estimate.rel_halfwidth <= self.precision
        problems = []
        if not self.reliable:
            problems.append(
                f"speed-up {self.estimate.value:.3g} is uncertain by ±{100 * self.estimate.rel_halfwidth:.1f}% "
                f"(target ±{100 * self.precision:.1f}%) after {self.rounds} rounds in {self.elapsed_s:.0f} s"
            )
        if self.foreign_load is not None and self.foreign_load > BUSY_WARNING:
            problems.append(f"other processes used {100 * self.foreign_load:.0f}% of the CPUs while timing")
        self.warning = "; ".join(problems) or None

    @property
    def arm_min_s(self) -> dict[str, float]:
        return {k: min(v) for k, v in self.times_s.items()}

    @property
    def arm_median_s(self) -> dict[str, float]:
        return {k: float(np.median(v)) for k, v in self.times_s.items()}


def make_sync(device: Any) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (no-op on CPU)."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.synchronize
        return lambda: None
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    if dev.type == "mps":
        return torch.mps.synchronize
    return lambda: None


class CpuMeter:
    """Share of the machine's CPU time used by *other* processes between start and stop.

    From ``/proc/stat`` (all CPUs' busy time, steal included: a VM's neighbours
    count) minus this process's own CPU time; ``None`` where ``/proc/stat`` does
    not exist.
    """

    _HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self) -> None:
        self._start = self._snapshot()

    @classmethod
    def _snapshot(cls) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        busy = (user + nice + system + irq + softirq + steal) / cls._HZ
        own = os.times()
        return busy, own.user + own.system, time.monotonic()

    def stop(self) -> float | None:
        end = self._snapshot()
        if self._start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start))
        if wall <= 0:
            return None
        return float(min(1.0, max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))))


def _arrays(times: Mapping[str, list[float]]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=float) for k, v in times.items()}


def _bootstrap(
    times: Mapping[str, np.ndarray], compose: Compose, confidence: float, resamples: int, seed: int
) -> Estimate:
    """Percentile interval of ``compose``'s ratio over rounds resampled with replacement."""
    rounds = len(next(iter(times.values())))
    mins = {k: float(v.min()) for k, v in times.items()}
    num, den = compose(mins)
    idx = np.random.default_rng(seed).integers(0, rounds, size=(resamples, rounds))
    b_num, b_den = compose({k: v[idx].min(axis=1) for k, v in times.items()})
    ratios = np.asarray(b_num, dtype=float) / np.asarray(b_den, dtype=float)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha])
    return Estimate(float(num / den), float(low), float(high), confidence)


def time_ratio(
    arms: Mapping[str, Callable[[], Any]],
    compose: Compose,
    *,
    warmup: int = 1,
    min_rounds: int = 5,
    precision: float = 0.05,
    budget_s: float = 30.0,
    max_rounds: int = 100_000,
    device: Any = None,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    timer: Callable[[], float] = time.perf_counter,
    repeats: Mapping[str, int] | None = None,
) -> Timing:
    """Time ``arms`` in alternating rounds until the speed-up is known to ``precision``.

    ``compose(per_arm)`` maps each arm's time (a float, or an array of bootstrap
    replicates) to ``(numerator, denominator)``; the speed-up is their ratio, e.g.
    ``lambda t: (t["baseline"], t["cached"])`` for whole loops. At least
    ``min_rounds`` rounds run; more run while the interval is wider than
    ``precision`` and the timing has lasted less than ``budget_s``.

    ``repeats`` (arm -> n) times ``n`` consecutive runs of an arm as one region and
    records the time per run: regions of equal length are equally likely to be
    interrupted by other processes, so their minima shrink alike.
    """
    if min_rounds < 2:
        raise ValueError(f"min_rounds must be >= 2 (a spread needs two rounds), got {min_rounds}")
    if warmup < 0 or not precision > 0 or budget_s < 0:
        raise ValueError("warmup must be >= 0, precision > 0 and budget_s >= 0")
    names = list(arms)
    reps = {n: int((repeats or {}).get(n, 1)) for n in names}
    if min(reps.values()) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = make_sync(device)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    sync()

    meter = CpuMeter()
    times: dict[str, list[float]] = {n: [] for n in names}
    start, next_check = timer(), min_rounds
    estimate, checked = None, 0
    for r in range(max_rounds):
        for name in names if r % 2 == 0 else reversed(names):
            sync()
            t0 = timer()
            for _ in range(reps[name]):
                arms[name]()
            sync()
            times[name].append((timer() - t0) / reps[name])
        rounds = r + 1
        if rounds < next_check:
            continue
        estimate, checked = _bootstrap(_arrays(times), compose, confidence, resamples, seed), rounds
        if estimate.rel_halfwidth <= precision or timer() - start >= budget_s:
            break
        next_check = rounds + max(1, rounds // 10)  # bootstrap cost stays a small share
    if checked != rounds:
        estimate = _bootstrap(_arrays(times), compose, confidence, resamples, seed)
    num, den = compose({k: min(v) for k, v in times.items()})
    return Timing(
        times_s=times, rounds=rounds, warmup=warmup, elapsed_s=timer() - start, estimate=estimate,
        numerator_s=float(num), denominator_s=float(den), precision=precision, foreign_load=meter.stop(),
    )
