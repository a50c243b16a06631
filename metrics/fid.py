"""Fréchet distance (FID, and sFID on spatial features): pure float64 math, no feature extraction.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule
converge to a local Nash equilibrium") is the Fréchet distance between two
Gaussians fitted to features (Dowson & Landau 1982):

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

sFID (Nash et al. 2021, "Generating images with sparse representations";
the ADM evaluator's ``sFID``) is the same distance on the spatial features
(``"spatial"`` key; ADM ``mixed_6/conv``, first 7 channels), see
:func:`spatial_frechet_distance`.

Conventions follow the ADM evaluator (openai/guided-diffusion
``evaluations/evaluator.py``, ``FIDStatistics.frechet_distance``), itself the
TTUR reference code: statistics are ``mean`` and the unbiased ``np.cov``; the
matrix square root is ``scipy.linalg.sqrtm``; when it is not finite, ``eps * I``
is added to both covariances and it is retried; a complex result is accepted
when the imaginary part of its diagonal is within 1e-3 and its real part used.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from metrics.features import check_features

__all__ = ["statistics", "frechet_distance", "spatial_frechet_distance", "SQRTM_EPS", "IMAG_ATOL"]

SQRTM_EPS = 1e-6  # ADM / TTUR offset added to the covariances when sqrtm is not finite
IMAG_ATOL = 1e-3  # ADM / TTUR tolerance on the imaginary part of sqrtm's diagonal


def _as_float64(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf")
    return x


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """N x D features (numpy or torch) -> (mean, unbiased covariance), float64 (ADM / TTUR convention)."""
    features = check_features(features)
    if features.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature rows, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's sqrtm without its singular-matrix warning (ADM calls it with ``disp=False``, also silent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = SQRTM_EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; FID, Heusel et al. 2017)."""
    mu1, mu2 = np.atleast_1d(_as_float64(mu1, "mu1")), np.atleast_1d(_as_float64(mu2, "mu2"))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1, "sigma1")), np.atleast_2d(_as_float64(sigma2, "sigma2"))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d} x {d}, got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"sqrtm(sigma1 sigma2) is not finite; retrying with {eps:g} * I added to both covariances")
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > IMAG_ATOL:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary diagonal part of {imag:.3g} (> {IMAG_ATOL:g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def spatial_frechet_distance(spatial_features, ref_mu_s, ref_sigma_s) -> float:
    """sFID (Nash et al. 2021): Fréchet distance of N x S spatial features against reference ``mu_s, sigma_s``."""
    return frechet_distance(*statistics(spatial_features), ref_mu_s, ref_sigma_s)
