"""Bootstrap intervals of the quality metrics (metrics/bootstrap.py), checked against closed forms,
recomputation on copied rows and repeated draws -- never against the bootstrap itself."""

import numpy as np
import pytest
from scipy.special import softmax

from metrics.bootstrap import (
    QUALITY_INTERVAL,
    FrechetReplicates,
    InceptionScoreReplicates,
    MeanReplicates,
    PrecisionRecallReplicates,
    bootstrap,
    check_resamples,
    intervals,
    paired_intervals,
    resample_indices,
)
from metrics.fid import frechet_distance, statistics
from metrics.isc import inception_score
from metrics.prc import precision_recall

Z = 1.959963984540054


def _normal_interval(value, reps):
    h = Z * np.std(reps, ddof=1)
    return value - h, value + h


# ------------------------------------------------------------------- replicates = recomputation on copies


def test_frechet_replicate_equals_fid_of_the_copied_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = statistics(rng.normal(size=(500, 16)))
    rep = FrechetReplicates(x, mu, sigma)
    assert rep.value(np.ones(300)) == pytest.approx(frechet_distance(*statistics(x), mu, sigma), rel=1e-10)
    for idx in resample_indices(300, 5, seed=1):  # scipy sqrtm on the copied rows: an independent computation
        assert rep(idx)["fid"] == pytest.approx(frechet_distance(*statistics(x[idx]), mu, sigma), rel=1e-9)


def test_frechet_replicate_with_fewer_samples_than_dimensions():
    """n < D takes the n x n Gram matrix instead of the D x D one: the same FID (to 1e-6: scipy's sqrtm
    of the singular product S R is itself only that accurate near its zero eigenvalues)."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(10, 40))
    mu, sigma = statistics(rng.normal(size=(60, 40)))
    for idx in resample_indices(10, 3, seed=2):
        assert FrechetReplicates(x, mu, sigma)(idx)["fid"] == pytest.approx(
            frechet_distance(*statistics(x[idx]), mu, sigma), rel=1e-6)


def test_frechet_replicate_with_a_singular_reference():
    """Rank-deficient reference covariance (dead features, fewer reference images than dimensions)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 12))
    ref = rng.normal(size=(8, 12))  # rank 7 covariance
    mu, sigma = statistics(ref)
    idx = rng.integers(0, 200, 200)
    expected = frechet_distance(*statistics(x[idx]), mu, sigma)
    assert FrechetReplicates(x, mu, sigma)(idx)["fid"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("neighbours", [32, 3])  # 3: most radii fall off the neighbour list -> recomputed
def test_precision_recall_replicate_equals_recomputing_on_the_copied_rows(neighbours):
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(150, 6)), rng.normal(0.2, 1.1, size=(200, 6))
    rep = PrecisionRecallReplicates(real, fake, k=3, neighbours=neighbours, batch_size=64)
    for idx in resample_indices(200, 12, seed=3):
        got = rep(idx)
        assert (got["precision"], got["recall"]) == precision_recall(real, fake[idx], k=3, batch_size=64)
    assert (rep.recomputed > 0) == (neighbours == 3)


def test_precision_recall_replicate_of_every_row_once_is_the_value():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(80, 5)), rng.normal(size=(90, 5))
    got = PrecisionRecallReplicates(real, fake, k=3, batch_size=32)(np.arange(90))
    assert (got["precision"], got["recall"]) == precision_recall(real, fake, k=3)


def test_inception_score_replicate_splits_the_resampled_order():
    probs = softmax(np.random.default_rng(5).normal(scale=3, size=(120, 10)), axis=1)
    idx = np.random.default_rng(6).integers(0, 120, 120)
    assert InceptionScoreReplicates(probs, 40)(idx)["is_mean"] == inception_score(probs[idx], 40)[0]


# ---------------------------------------------------------------------------------- closed forms


def test_mean_interval_is_the_normal_interval_of_a_mean():
    """The bootstrap of a mean has sd s / sqrt(n) (s with ddof=0): mean +- 1.96 s / sqrt(n) for large n."""
    values = np.random.default_rng(7).gamma(2.0, 3.0, size=5000)  # skewed, like clamped CLIP scores
    reps = bootstrap([MeanReplicates(values, "clip_score")], len(values), 400, seed=0)
    got = intervals({"clip_score": values.mean()}, reps)
    half = Z * values.std() / np.sqrt(len(values))
    assert got["clip_score_high"] - values.mean() == pytest.approx(half, rel=0.1)  # sd of sd ~ 1/sqrt(800)
    assert got["clip_score_low"] < values.mean() < got["clip_score_high"]


def test_fid_interval_covers_the_true_fid_and_shrinks_like_one_over_sqrt_n():
    """Gaussian features N(mu_g, s^2 I) against the reference N(mu_r, I) given exactly: the population FID is
    |mu_g - mu_r|^2 + D (s - 1)^2 in closed form. Over repeated draws the 95 % interval covers it in about
    95 % of them, and quadrupling n halves its width (the mean term dominates: sd 2 s |dmu| / sqrt(n))."""
    d, s, shift = 2, 1.2, np.array([1.0, 0.0])
    true_fid = shift @ shift + d * (s - 1) ** 2
    mu_r, sigma_r = np.zeros(d), np.eye(d)
    hits, widths = 0, {400: [], 1600: []}
    for draw in range(60):
        rng = np.random.default_rng(100 + draw)
        for n in widths:
            x = shift + s * rng.normal(size=(n, d))
            value = frechet_distance(*statistics(x), mu_r, sigma_r)
            reps = bootstrap([FrechetReplicates(x, mu_r, sigma_r)], n, 100, seed=draw)["fid"]
            low, high = _normal_interval(value, reps)
            widths[n].append(high - low)
            if n == 400:
                hits += low <= true_fid <= high
                assert low <= value <= high
    assert 0.85 <= hits / 60 <= 1.0
    assert np.mean(widths[400]) / np.mean(widths[1600]) == pytest.approx(2.0, rel=0.12)
    assert np.mean(widths[400]) / 2 == pytest.approx(Z * 2 * s * 1.0 / np.sqrt(400), rel=0.12)


def test_normal_interval_covers_the_expected_fid_where_the_percentile_interval_fails():
    """In 32 dimensions at n = 200 a replicate FID carries the plug-in bias twice (the value once, the
    resampling once more): the percentile interval lies above the value it belongs to and misses E[FID_n];
    the normal interval (the one recorded) covers E[FID_n] in about 95 % of the draws."""
    d, n = 32, 200
    rng = np.random.default_rng(8)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    mu_g, chol = rng.normal(scale=0.1, size=d), np.linalg.cholesky(a @ a.T + 0.5 * np.eye(d))
    mu_r, sigma_r = np.zeros(d), np.eye(d)
    draws = [mu_g + rng.normal(size=(n, d)) @ chol.T for _ in range(400)]
    expected = np.mean([FrechetReplicates(x, mu_r, sigma_r).value(np.ones(n)) for x in draws])  # E[FID_n]
    normal = percentile = contains = 0
    for i, x in enumerate(draws[:60]):
        value = frechet_distance(*statistics(x), mu_r, sigma_r)
        reps = bootstrap([FrechetReplicates(x, mu_r, sigma_r)], n, 100, seed=i)["fid"]
        low, high = _normal_interval(value, reps)
        normal += low <= expected <= high
        p_low, p_high = np.quantile(reps, [0.025, 0.975])
        percentile += p_low <= expected <= p_high
        contains += p_low <= value <= p_high
    assert normal / 60 >= 0.85
    assert percentile / 60 <= 0.2 and contains / 60 <= 0.2


# ---------------------------------------------------------------------------------------- paired


def _paired_halfwidths(a, b, resamples=300):
    mu_r, sigma_r = np.zeros(a.shape[1]), np.eye(a.shape[1])
    n = len(a)
    ra = bootstrap([FrechetReplicates(a, mu_r, sigma_r)], n, resamples, seed=0)
    rb = bootstrap([FrechetReplicates(b, mu_r, sigma_r)], n, resamples, seed=0)
    va, vb = (frechet_distance(*statistics(x), mu_r, sigma_r) for x in (a, b))
    delta = paired_intervals({"fid": va}, ra, {"fid": vb}, rb)
    one, two = intervals({"fid": va}, ra), intervals({"fid": vb}, rb)
    unpaired = np.hypot(one["fid_high"] - va, two["fid_high"] - vb)  # independent: variances add
    assert delta["fid_delta"] == pytest.approx(va - vb)
    assert delta["fid_delta_low"] < delta["fid_delta"] < delta["fid_delta_high"]
    return delta["fid_delta_high"] - delta["fid_delta"], unpaired, ra["fid"] - rb["fid"]


def test_paired_interval_is_narrower_when_the_pairs_are_correlated():
    rng = np.random.default_rng(9)
    a = 0.5 + rng.normal(size=(400, 3))
    b = a + 0.1 * rng.normal(size=a.shape)  # sample i of both from the same noise
    paired, unpaired, _ = _paired_halfwidths(a, b)
    assert paired < 0.25 * unpaired


def test_paired_interval_of_independent_sets_is_the_unpaired_difference():
    """With the same indices drawn for two independent sets, the replicate differences have the variance
    of the difference of independent estimates: var(a) + var(b)."""
    rng = np.random.default_rng(10)
    a, b = 0.5 + rng.normal(size=(400, 3)), 0.3 + rng.normal(size=(400, 3))
    paired, unpaired, diffs = _paired_halfwidths(a, b)
    assert paired == pytest.approx(unpaired, rel=0.15)
    # and the distribution itself: the differences of independently drawn replicates look alike
    other = bootstrap([FrechetReplicates(b, np.zeros(3), np.eye(3))], 400, 300, seed=1)["fid"]
    same = bootstrap([FrechetReplicates(a, np.zeros(3), np.eye(3))], 400, 300, seed=0)["fid"]
    assert np.std(same - other) == pytest.approx(np.std(diffs), rel=0.15)


# ---------------------------------------------------------------------------------------- settings


def test_fixed_seed_gives_the_same_interval_and_another_seed_another():
    values = np.random.default_rng(11).normal(size=500)
    run = lambda seed: bootstrap([MeanReplicates(values, "m")], 500, 50, seed=seed)["m"]  # noqa: E731
    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


@pytest.mark.parametrize("bad", [-1, 1, 9, 2.5, True, "many"])
def test_bad_resamples_are_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="quality.resamples") as err:
        check_resamples(bad)
    assert "\n" not in str(err.value)


def test_zero_and_enough_resamples_are_accepted():
    assert check_resamples(0) == 0 and check_resamples(200) == 200 and QUALITY_INTERVAL == "bootstrap-normal-95"
