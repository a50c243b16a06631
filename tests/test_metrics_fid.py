"""Fréchet distance against closed forms and independent implementations."""

import numpy as np
import pytest
import torch
from scipy import linalg

from metrics import fid
from metrics.fid import frechet_distance, spatial_frechet_distance, statistics


def _random_stats(rng, d, n=None):
    n = n or 3 * d
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


def _fid_by_eigh(mu1, s1, mu2, s2):
    """Independent route: Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2, via symmetric eigendecompositions."""
    w, v = linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_mean_shift_only():
    """Equal covariances: the distance is the squared mean difference."""
    rng = np.random.default_rng(1)
    mu, s = _random_stats(rng, 8)
    shift = rng.normal(size=8)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(shift @ shift, rel=1e-6, abs=1e-8)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(2)
    mu, s = _random_stats(rng, 64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6


@pytest.mark.parametrize("d", [4, 64])
def test_agrees_with_torch_fidelity_and_eigh(d):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(d)
    mu1, s1 = _random_stats(rng, d)
    mu2, s2 = _random_stats(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-8)
    assert ours == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-8)


def test_statistics_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 5))
    mu, sigma = statistics(x)
    centred = x - x.mean(0)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)


def test_accepts_torch_tensors():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(40, 6)), rng.normal(1.0, 2.0, size=(40, 6))
    ref = frechet_distance(*statistics(x), *statistics(y))
    tensors = frechet_distance(*statistics(torch.from_numpy(x).float()), *[torch.from_numpy(a) for a in statistics(y)])
    assert tensors == pytest.approx(ref, rel=1e-5)


def test_sqrtm_fallback_adds_eps_identity(monkeypatch):
    """A non-finite sqrtm triggers the ADM retry with eps*I added to both covariances."""
    rng = np.random.default_rng(5)
    mu1, s1 = _random_stats(rng, 6)
    mu2, s2 = _random_stats(rng, 6)
    real_sqrtm, calls = linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(UserWarning, match="not finite"):
        value = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    off = np.eye(6) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    exact = _fid_by_eigh(mu1, s1, mu2, s2)
    assert value == pytest.approx(exact, abs=0.1) and value != exact


def test_large_imaginary_component_is_an_error(monkeypatch):
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: np.eye(len(a)) * (1 + 0.5j))
    with pytest.raises(ValueError, match="imaginary") as err:
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))
    assert "\n" not in str(err.value)


def test_sfid_is_frechet_distance_of_spatial_statistics():
    rng = np.random.default_rng(6)
    spatial = rng.normal(size=(30, 7))
    mu_s, sigma_s = _random_stats(rng, 7)
    assert spatial_frechet_distance(spatial, mu_s, sigma_s) == frechet_distance(*statistics(spatial), mu_s, sigma_s)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "mean vectors"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(2)), "covariances"),
        ((np.array([0.0, np.nan, 0.0]), np.eye(3), np.zeros(3), np.eye(3)), "NaN"),
    ],
)
def test_bad_statistics_raise_one_line(args, match):
    with pytest.raises(ValueError, match=match) as err:
        frechet_distance(*args)
    assert "\n" not in str(err.value)


def test_nan_features_raise_one_line():
    x = np.ones((4, 3))
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf in 1 of 4 rows") as err:
        statistics(x)
    assert "\n" not in str(err.value)


def test_a_complex_square_root_with_a_negative_real_diagonal_uses_its_real_part():
    """Covariances of rank-deficient features are PSD only up to rounding: here S2 has an
    eigenvalue of -1e-12. With S1 = P^2 and S2 = P^-1 N P^-1, S1 S2 = P N P^-1, whose principal
    square root P N^(1/2) P^-1 is complex (sqrt(-1e-12) = 1e-6 i, a tiny imaginary part ADM
    accepts) and has a *negative* real diagonal entry (-4) -- its trace is still Tr N^(1/2)
    = 0 + 4. Only the real part gives that; the modulus of each entry would give 12."""
    p = np.array([[2.0, 1.0], [1.0, 1.0]])
    p_inv = np.linalg.inv(p)
    n = np.diag([-1e-12, 16.0])
    s1, s2 = p @ p, p_inv @ n @ p_inv
    root = linalg.sqrtm(s1 @ s2)
    assert np.iscomplexobj(root) and 0 < np.abs(np.diagonal(root).imag).max() < fid.IMAG_ATOL
    assert np.diagonal(root).real.min() == pytest.approx(-4.0)  # the case this test is about
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 1.0])
    closed = (0.5**2 + 3.0**2) + np.trace(s1) + np.trace(s2) - 2 * 4.0
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(closed, rel=1e-9)
    assert ours == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-9)
