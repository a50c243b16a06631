"""The 1:N schedules (paper Sec. 3.3; docs/conventions.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.caching.schedules import ScheduleError, full_calls, nonuniform_full_calls, uniform_full_calls


class Ambiguous(Exception):
    """An interior point within rounding error of an integer: truncation is float luck."""


def reference_nonuniform(T, N, c, p):
    """Independent, pure-Python rewrite of docs/conventions.md §2 (builtin complex power).

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


# Generated with the authors' `sample_from_quad_center` in
# `DeepCache/sd/pipeline_stable_diffusion.py` of horseee/DeepCache (commit 1691a3a), called as
# `sample_from_quad_center(T, ceil(T / N), center=c, pow=p)` under numpy 2.4.6 on x86_64 Linux;
# the copy in `experiments/ddpm/ddpm/functions/deepcache_denoising.py` gives the same lists.
# Entries: ((T, N, c, p), power the authors' loop ended at (rounded to 10 digits), full calls).
# Truncation makes some of these depend on the last bit of each power, so they pin the exact
# arithmetic (Python's power for the end points, numpy's for the points), not only the idea.
AUTHORS_SCHEDULES = [
    # SD default c=15, p=1.4 (50 steps; PLMS makes 51 calls)
    ((50, 2, 15, 1.4), 1.4, [
        0, 2, 4, 6, 7, 9, 11, 12, 14, 15, 17, 18, 20, 22, 24, 26, 28, 30, 32, 35, 37, 39, 42,
        44, 47
    ]),
    ((50, 3, 15, 1.4), 1.4, [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46]),
    ((50, 4, 15, 1.4), 1.4, [0, 4, 7, 10, 14, 16, 19, 23, 27, 31, 35, 40, 45]),
    ((50, 5, 15, 1.4), 1.4, [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]),
    ((50, 6, 15, 1.4), 1.4, [0, 5, 10, 15, 18, 24, 29, 36, 42]),
    ((50, 7, 15, 1.4), 1.4, [0, 6, 11, 15, 21, 27, 34, 42]),
    ((50, 8, 15, 1.4), 1.4, [0, 7, 13, 18, 25, 32, 40]),
    ((51, 2, 15, 1.4), 1.4, [
        0, 2, 4, 6, 7, 9, 11, 12, 14, 15, 16, 18, 20, 21, 23, 25, 27, 29, 31, 34, 36, 38, 41,
        43, 45, 48
    ]),
    ((51, 3, 15, 1.4), 1.4, [0, 3, 6, 8, 11, 13, 15, 17, 20, 23, 26, 29, 32, 36, 39, 43, 47]),
    ((51, 4, 15, 1.4), 1.4, [0, 4, 7, 11, 14, 16, 20, 23, 27, 31, 36, 41, 45]),
    ((51, 5, 15, 1.4), 1.4, [0, 5, 8, 12, 15, 19, 24, 28, 33, 39, 45]),
    ((51, 6, 15, 1.4), 1.4, [0, 5, 10, 15, 19, 24, 30, 36, 43]),
    ((51, 7, 15, 1.4), 1.4, [0, 6, 11, 16, 21, 28, 35, 42]),
    ((51, 8, 15, 1.4), 1.4, [0, 7, 13, 18, 25, 33, 41]),
    # Table 9, LDM-4-G, DDIM-250
    ((250, 2, 120, 1.2), 1.2, [
        0, 3, 5, 7, 9, 12, 14, 16, 18, 20, 22, 25, 27, 29, 31, 33, 35, 37, 39, 41, 44, 46, 48,
        50, 52, 54, 56, 58, 60, 62, 64, 66, 68, 70, 72, 74, 76, 78, 80, 81, 83, 85, 87, 89, 91,
        93, 95, 96, 98, 100, 102, 104, 106, 107, 109, 111, 113, 114, 116, 118, 120, 121, 122,
        124, 126, 128, 129, 131, 133, 135, 137, 138, 140, 142, 144, 146, 148, 150, 151, 153,
        155, 157, 159, 161, 163, 165, 167, 169, 171, 173, 175, 177, 179, 181, 183, 185, 187,
        189, 191, 193, 195, 197, 199, 201, 204, 206, 208, 210, 212, 214, 216, 219, 221, 223,
        225, 227, 229, 232, 234, 236, 238, 241, 243, 245, 247
    ]),
    ((250, 3, 120, 1.2), 1.2, [
        0, 4, 7, 10, 14, 17, 20, 23, 26, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57, 60, 63, 66, 69,
        72, 75, 78, 81, 84, 87, 89, 92, 95, 98, 100, 103, 106, 108, 111, 114, 116, 119, 121,
        123, 126, 128, 131, 134, 136, 139, 142, 145, 147, 150, 153, 156, 159, 162, 164, 167,
        170, 173, 176, 179, 182, 185, 188, 191, 194, 198, 201, 204, 207, 210, 213, 217, 220,
        223, 226, 230, 233, 236, 239, 243, 246
    ]),
    ((250, 5, 110, 1.4), 1.4, [
        0, 6, 11, 16, 22, 27, 32, 37, 42, 47, 51, 56, 61, 66, 70, 75, 80, 84, 89, 93, 98, 102,
        107, 110, 115, 119, 124, 128, 133, 138, 142, 147, 152, 157, 162, 167, 172, 177, 182,
        187, 193, 198, 204, 209, 215, 220, 226, 232, 238, 244
    ]),
    ((250, 10, 110, 1.2), 1.2, [
        0, 11, 22, 32, 43, 53, 62, 72, 81, 91, 99, 108, 116, 125, 134, 144, 153, 163, 173, 184,
        194, 205, 216, 227, 238
    ]),
    ((250, 20, 120, 1.4), 1.4, [0, 22, 42, 61, 80, 98, 115, 131, 149, 168, 187, 207, 228]),
    # Table 7 (p=1.2) and Table 8 (c=120), N=20, DDIM-250
    ((250, 20, 10, 1.2), 1.2, [0, 11, 25, 41, 58, 77, 96, 117, 137, 159, 181, 203, 226]),
    ((250, 20, 20, 1.2), 1.2, [0, 14, 26, 42, 59, 77, 96, 116, 137, 159, 181, 203, 226]),
    ((250, 20, 50, 1.2), 1.2, [0, 17, 33, 49, 64, 81, 99, 118, 139, 160, 181, 203, 226]),
    ((250, 20, 80, 1.2), 1.2, [0, 20, 38, 55, 72, 87, 105, 123, 142, 162, 183, 205, 227]),
    ((250, 20, 100, 1.2), 1.2, [0, 21, 40, 59, 76, 94, 109, 127, 145, 165, 185, 206, 227]),
    ((250, 20, 150, 1.2), 1.2, [0, 23, 44, 65, 85, 105, 123, 141, 156, 174, 191, 210, 229]),
    ((250, 20, 200, 1.2), 1.2, [0, 24, 47, 69, 90, 111, 132, 151, 169, 186, 201, 217, 233]),
    ((250, 20, 120, 1.05), 1.05, [0, 20, 40, 60, 79, 98, 116, 133, 151, 171, 190, 210, 229]),
    ((250, 20, 120, 1.1), 1.1, [0, 21, 41, 61, 80, 98, 116, 132, 150, 169, 189, 209, 229]),
    ((250, 20, 120, 1.3), 1.3, [0, 22, 42, 62, 80, 98, 115, 132, 149, 167, 187, 207, 228]),
    ((250, 20, 120, 1.5), 1.5, [0, 21, 41, 60, 79, 97, 115, 131, 149, 168, 187, 207, 228]),
    # Table 10, PartiPrompts / COCO2017, 50 steps
    ((50, 2, 15, 1.5), 1.5, [
        0, 2, 4, 5, 7, 9, 10, 12, 14, 15, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 37, 39, 42,
        44, 47
    ]),
    ((50, 3, 15, 1.3), 1.3, [0, 3, 6, 8, 11, 13, 15, 17, 20, 23, 26, 29, 32, 35, 39, 42, 46]),
    ((50, 5, 10, 1.5), 1.5, [0, 4, 7, 10, 14, 19, 24, 30, 36, 43]),
    ((50, 8, 10, 1.4), 1.4, [0, 6, 10, 16, 23, 31, 40]),
    ((50, 2, 20, 1.3), 1.2, [
        0, 3, 5, 7, 9, 11, 13, 14, 16, 18, 20, 21, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 43,
        45, 47
    ]),
    ((50, 5, 15, 1.3), 1.3, [0, 5, 10, 14, 17, 22, 26, 32, 37, 43]),
    ((50, 6, 15, 1.5), 1.5, [0, 5, 10, 14, 18, 23, 29, 35, 42]),
    ((50, 8, 20, 1.3), 1.3, [0, 8, 14, 20, 26, 33, 41]),
    # T=100 (DDIM-100)
    ((100, 2, 15, 1.4), 1.4, [
        0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16, 17, 19, 20, 22, 23, 25, 27, 29, 31, 32, 34,
        36, 38, 40, 42, 45, 47, 49, 51, 53, 56, 58, 60, 63, 65, 68, 70, 73, 75, 78, 80, 83, 86,
        88, 91, 94, 97
    ]),
    ((100, 5, 15, 1.4), 1.4, [
        0, 4, 7, 10, 14, 16, 20, 24, 29, 33, 38, 44, 49, 55, 60, 66, 73, 79, 86, 93
    ]),
    ((100, 10, 50, 1.2), 1.2, [0, 11, 22, 32, 42, 50, 58, 68, 78, 89]),
    ((100, 20, 50, 1.2), 1.2, [0, 22, 42, 58, 78]),
    # end points: Python and numpy powers disagree
    ((50, 2, 2, 1.3), 1.3, [
        0, 1, 2, 3, 4, 5, 7, 9, 10, 12, 14, 16, 18, 20, 23, 25, 27, 29, 32, 34, 37, 39, 42, 44,
        47
    ]),
    ((50, 2, 3, 1.4), 1.18, [
        0, 2, 3, 4, 5, 7, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29, 31, 33, 35, 38, 40, 42, 45,
        47
    ]),
    ((51, 2, 3, 1.4), 1.36, [
        0, 1, 2, 3, 4, 5, 6, 8, 10, 11, 13, 15, 17, 19, 21, 23, 25, 28, 30, 32, 35, 37, 40, 42,
        45, 48
    ]),
    ((100, 3, 5, 1.6), 1.52, [
        0, 1, 3, 4, 5, 6, 7, 9, 11, 13, 15, 18, 20, 23, 25, 28, 31, 34, 37, 40, 44, 47, 51, 54,
        58, 62, 66, 70, 74, 78, 82, 86, 91, 95
    ]),
    ((250, 3, 10, 1.5), 1.42, [
        0, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 16, 17, 19, 21, 23, 25, 27, 29, 31, 34, 36, 38,
        41, 43, 45, 48, 51, 53, 56, 59, 61, 64, 67, 70, 73, 76, 79, 82, 85, 88, 91, 94, 97, 101,
        104, 107, 110, 114, 117, 121, 124, 128, 131, 135, 138, 142, 146, 149, 153, 157, 160,
        164, 168, 172, 176, 180, 183, 187, 191, 195, 199, 203, 208, 212, 216, 220, 224, 228,
        232, 237, 241, 245
    ]),
    ((250, 5, 3, 1.6), 1.46, [
        0, 2, 3, 4, 6, 8, 10, 13, 16, 19, 22, 26, 29, 33, 37, 41, 45, 50, 54, 59, 63, 68, 73,
        78, 83, 89, 94, 100, 105, 111, 117, 122, 128, 134, 141, 147, 153, 159, 166, 172, 179,
        186, 193, 199, 206, 213, 220, 228, 235, 242
    ]),
    # c = 0: the authors' construction is real
    ((24, 3, 0, 1.5), 1.5, [0, 1, 3, 5, 8, 11, 15, 19]),
    ((320, 20, 0, 1.5), 1.5, [
        0, 4, 14, 25, 39, 55, 73, 92, 113, 134, 158, 182, 207, 234, 261, 290
    ]),
    ((100, 5, 0, 1.2), 1.2, [
        0, 2, 6, 10, 14, 18, 23, 28, 33, 38, 43, 48, 54, 59, 65, 70, 76, 82, 88, 94
    ]),
]


@pytest.mark.parametrize(
    "case,power,expected",
    AUTHORS_SCHEDULES,
    ids=[f"T{c[0]}-N{c[1]}-c{c[2]}-p{c[3]}" for c, _, _ in AUTHORS_SCHEDULES],
)
def test_nonuniform_matches_the_authors_function(case, power, expected):
    calls, used = nonuniform_full_calls(*case)
    assert calls == expected
    assert used == pytest.approx(power, abs=1e-9)
    assert full_calls(case[0], case[1], "nonuniform", center=case[2], power=case[3]) == expected


def test_authors_cases_cover_the_retry_and_the_rounding_of_the_end_points():
    """The pinned cases are chosen to catch arithmetic rewrites, not only the happy path.

    Some need the p -= 0.02 retry (among them Table 10's COCO N = 2 setting at 50 steps), and
    for some the end points computed with numpy's complex power instead of Python's give a
    different schedule.
    """
    retried = [case for case, power, _ in AUTHORS_SCHEDULES if power < case[3] - 1e-9]
    assert (50, 2, 20, 1.3) in retried and len(retried) >= 5

    def with_numpy_end_points(T, N, c, p):
        n = math.ceil(T / N)
        while p > 1:
            a, b = np.power(complex(-c), 1.0 / p), np.power(complex(T - c), 1.0 / p)
            y = np.unique(np.trunc(np.power(np.linspace(a, b, n + 1), p).real).astype(np.int64))
            calls = [0] + [int(v + c) for v in y[1:-1]]
            if len(calls) == n:
                return calls
            p -= 0.02
        return None

    differ = [case for case, _, expected in AUTHORS_SCHEDULES if with_numpy_end_points(*case) != expected]
    assert (50, 2, 2, 1.3) in differ


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
