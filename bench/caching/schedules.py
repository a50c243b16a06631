"""Which model calls run the full U-Net: the 1:N caching schedules of DeepCache.

Calls are counted in *model calls* (the sampler's loop index, 0-based), never by
timestep value: PLMS repeats a timestep, so a lookup by value is ambiguous.

Source: DeepCache (Ma, Fang, Wang, CVPR 2024), Sec. 3.3 "uniform 1:N" and
"non-uniform 1:N"; supplementary Tables 7-10 for the hyper-parameters. The exact
construction and its sources: docs/conventions.md §2.
"""

from __future__ import annotations

import math

import numpy as np

from bench.core.options import Schedule

SCHEDULES = Schedule.names()  # uniform, nonuniform, none


class ScheduleError(ValueError):
    """A schedule cannot be built from the given settings."""


def uniform_full_calls(num_calls: int, interval: int) -> list[int]:
    """Uniform 1:N: the full network runs on calls 0, N, 2N, ... (``i % N == 0``)."""
    _check(num_calls, interval)
    return list(range(0, num_calls, interval))


def nonuniform_full_calls(
    num_calls: int, interval: int, center: float, power: float
) -> tuple[list[int], float]:
    """Non-uniform 1:N with center ``c`` and power ``p`` (paper Sec. 3.3, Tables 7-10).

    Full calls are denser around call ``c``: with ``n = ceil(T / N)`` full calls,
    ``n + 1`` points are spaced evenly between ``(-c)^(1/p)`` and ``(T - c)^(1/p)``
    and mapped back through ``x^p``. The powers are *complex* (principal branch), as
    in the authors' implementation: the negative side keeps ``Re((-c)^(1/p)·t)^p``,
    which is not ``-|x|^p``. The real part is truncated toward zero, sorted and
    de-duplicated; both end points are dropped, ``c`` is added back and call 0 is
    prepended. If that does not give exactly ``n`` calls, ``p`` is lowered by 0.02
    and the construction repeated while ``p > 1``. For ``c = 0`` the authors' start
    point ``(-0)^(1/p)`` is the real ``0.0``, so their construction is real throughout;
    so is this one (a complex power of a positive real rounds differently).

    Returns ``(full_calls, power_used)``.
    """
    _check(num_calls, interval)
    if not power > 1:
        raise ScheduleError(f"cache.power must be > 1 for the non-uniform schedule, got {power}")
    if not 0 <= center <= num_calls:
        raise ScheduleError(
            f"cache.center must lie in [0, {num_calls}] (the number of model calls), got {center}"
        )
    n = math.ceil(num_calls / interval)
    p = float(power)
    while p > 1:
        # End points with Python's power, the points with numpy, as the authors did:
        # results that truncate at exact integers depend on the rounding of each step.
        if center == 0:
            # (-0) ** (1/p) is the real 0.0 in the authors' code, so for c = 0 their
            # whole construction is real; a complex power here would round differently.
            a, b = 0.0, float(num_calls) ** (1.0 / p)
        else:
            a = complex(-center) ** (1.0 / p)
            b = complex(num_calls - center) ** (1.0 / p)
        x = np.linspace(a, b, n + 1)
        y = np.unique(np.trunc(np.power(x, p).real).astype(np.int64))
        calls = [0] + [int(v + center) for v in y[1:-1]]
        if len(calls) == n:
            return calls, round(p, 10)
        p -= 0.02
    raise ScheduleError(
        f"no non-uniform schedule with {n} full calls exists for T={num_calls}, "
        f"N={interval}, cache.center={center} at any power in (1, {power}]: "
        "try another cache.center or a larger cache.interval"
    )


def full_calls(
    num_calls: int,
    interval: int,
    schedule: str = Schedule.uniform.value,
    center: float | None = None,
    power: float | None = None,
) -> list[int]:
    """The sorted model-call indices that run the full network for a schedule."""
    if schedule == Schedule.none:
        _check(num_calls, 1)
        return list(range(num_calls))
    if schedule == Schedule.uniform:
        return uniform_full_calls(num_calls, interval)
    if schedule == Schedule.nonuniform:
        if center is None or power is None:
            raise ScheduleError("the non-uniform schedule needs cache.center and cache.power")
        return nonuniform_full_calls(num_calls, interval, center, power)[0]
    raise ScheduleError(f"cache.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")


def _check(num_calls: int, interval: int) -> None:
    if int(interval) != interval or interval < 1:
        raise ScheduleError(f"cache.interval must be an integer >= 1, got {interval}")
    if int(num_calls) != num_calls or num_calls < 1:
        raise ScheduleError(f"the number of model calls must be >= 1, got {num_calls}")
