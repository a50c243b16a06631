"""The 1:N schedules (paper Sec. 3.3; FACTS.md section 2)."""

from __future__ import annotations

import math

import pytest

from bench.schedules import ScheduleError, full_calls, nonuniform_full_calls, uniform_full_calls


class Ambiguous(Exception):
    """An interior point within rounding error of an integer: truncation is float luck."""


def reference_nonuniform(T, N, c, p):
    """Independent, pure-Python rewrite of FACTS.md section 2 (builtin complex power).

    Returns every schedule the construction can give. The end points map back to the
    integers -c and T - c up to the last bit, so each may truncate to its neighbour
    toward zero; all four outcomes are followed. An interior point within rounding
    error of an integer is reported as ambiguous instead.
    """
    n = math.ceil(T / N)
    possible = set()
    while p > 1:
        a, b = complex(-c) ** (1 / p), complex(T - c) ** (1 / p)
        xs = [a + (b - a) * i / n for i in range(1, n)]
        reals = [(x**p).real for x in xs]
        if any(abs(r - round(r)) < 1e-9 for r in reals):
            raise Ambiguous
        interior = {int(r) for r in reals}  # int() truncates toward zero
        failed = False
        for first in {-c, min(-c + 1, 0)}:
            for last in {T - c, max(T - c - 1, 0)}:
                ys = sorted({first, last, *interior})
                calls = [0] + [y + c for y in ys[1:-1]]
                if len(calls) == n:
                    possible.add((tuple(calls), round(p, 6)))
                else:
                    failed = True
        if not failed:
            break
        p -= 0.02
    return possible


def test_uniform():
    assert uniform_full_calls(100, 5) == list(range(0, 100, 5))
    assert uniform_full_calls(51, 5)[-1] == 50
    assert uniform_full_calls(7, 1) == list(range(7))
    assert full_calls(10, 3, "none") == list(range(10))


CASES = [
    (T, N, c, p)
    for T in (50, 51, 100, 250)
    for N in (2, 3, 5, 10, 20)
    for c, p in ((15, 1.4), (10, 1.5), (20, 1.3), (0, 1.2), (120, 1.2), (110, 1.4))
    if c <= T
]


@pytest.mark.parametrize("T,N,c,p", CASES)
def test_nonuniform_properties_and_independent_rewrite(T, N, c, p):
    calls, used = nonuniform_full_calls(T, N, c, p)
    assert len(calls) == math.ceil(T / N)
    assert calls[0] == 0
    assert calls == sorted(set(calls))
    assert all(0 <= i < T for i in calls)
    try:
        possible = reference_nonuniform(T, N, c, p)
    except Ambiguous:
        return
    assert (tuple(calls), round(used, 6)) in possible


def test_most_cases_are_compared_with_the_rewrite():
    compared = 0
    for case in CASES:
        try:
            compared += bool(reference_nonuniform(*case))
        except Ambiguous:
            pass
    assert compared >= len(CASES) // 2


def test_nonuniform_is_denser_near_the_center():
    calls, _ = nonuniform_full_calls(250, 10, 110, 1.2)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    near = min(range(len(calls)), key=lambda i: abs(calls[i] - 110))
    assert gaps[near] < gaps[0] and gaps[near] < gaps[-1]


def test_complex_power_is_not_the_real_valued_rewrite():
    """sign(x)|x|^p gives a different schedule; the authors' complex power is kept."""
    T, N, c, p = 50, 5, 15, 1.4
    n = math.ceil(T / N)
    a, b = -(c ** (1 / p)), (T - c) ** (1 / p)
    xs = [a + (b - a) * i / n for i in range(n + 1)]
    real = sorted({int(math.copysign(abs(x) ** p, x)) for x in xs})
    real_calls = [0] + [y + c for y in real[1:-1]]
    assert nonuniform_full_calls(T, N, c, p)[0] != real_calls


def test_power_retry_lowers_p():
    """When duplicates collapse the list, p is lowered in steps of 0.02."""
    found = [(T, N, c, p) for (T, N, c, p) in CASES if nonuniform_full_calls_or_none(T, N, c, p)]
    lowered = [case for case in found if nonuniform_full_calls(*case)[1] < case[3] - 1e-9]
    assert lowered, "expected at least one case that needs the retry"
    for T, N, c, p in lowered:
        used = nonuniform_full_calls(T, N, c, p)[1]
        assert ((p - used) / 0.02) == pytest.approx(round((p - used) / 0.02))


def nonuniform_full_calls_or_none(*case):
    try:
        return nonuniform_full_calls(*case)
    except ScheduleError:
        return None


def test_no_power_fits_is_a_clear_error():
    with pytest.raises(ScheduleError, match="no non-uniform schedule with 50 full calls exists"):
        nonuniform_full_calls(50, 1, 15, 1.4)


@pytest.mark.parametrize(
    "args,match",
    [((10, 0), "cache.interval"), ((0, 2), "model calls"), ((10, 2.5), "cache.interval")],
)
def test_bad_uniform_args(args, match):
    with pytest.raises(ScheduleError, match=match):
        uniform_full_calls(*args)


def test_bad_nonuniform_args():
    with pytest.raises(ScheduleError, match="cache.power"):
        nonuniform_full_calls(50, 5, 15, 1.0)
    with pytest.raises(ScheduleError, match="cache.center"):
        nonuniform_full_calls(50, 5, 60, 1.4)
    with pytest.raises(ScheduleError, match="cache.schedule"):
        full_calls(50, 5, "sometimes")
