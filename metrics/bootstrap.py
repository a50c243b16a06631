"""Bootstrap intervals of the quality metrics: resample the generated samples, keep the reference fixed.

A quality number measured on n generated samples is a random variable: other seeds
give another value. Its spread is estimated by the nonparametric bootstrap (Efron
1979; Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 6 and 13):
draw n of the n samples with replacement, recompute the metric on their *features*
(extracted once; nothing is re-extracted), repeat ``resamples`` times. The
reference (its statistics, its precision/recall manifold) stays fixed, so the
interval is the uncertainty due to the generated samples alone.

**Interval.** ``value ± z * sd`` with ``sd`` the standard deviation of the
replicates and z = 1.96 (95 %): the standard-normal bootstrap interval (Efron &
Tibshirani 1993, eq. 13.3). It estimates where the metric of another draw of n
samples would fall (its target is the metric's expectation *at this n*), and it
always contains the reported value. The percentile interval (quantiles of the
replicates) is not used: a plug-in FID replicate is biased upwards once more by
the resampling (duplicated rows shrink the covariance's effective sample size),
and resampled k-NN manifolds shrink (a duplicated point is its own neighbour), so
percentile intervals of FID and recall miss the value they are built around
(``tests/test_metrics_bootstrap.py`` measures their coverage: near 0 for both).
The FID's own finite-n bias (it falls with n, Chong & Forsyth 2020, "Effectively
unbiased FID") is *not* corrected: rows at the same n share it, and the value
reported stays the ADM number.

**Paired.** A cached run and its baseline start sample i from the same noise
(``bench.core.seeds``). Drawing the same indices for both and bootstrapping the
difference of the metric gives the interval of the difference, much tighter
than the two intervals side by side when the pairs are correlated
(:func:`paired_intervals`).

**Seeds.** The indices come from ``numpy.random.default_rng(seed)``, one row of
n per resample, so a record is reproducible and a run and its baseline (scored
alone or paired) get the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import norm

from metrics.features import check_features, no_tf32
from metrics.isc import inception_score

__all__ = [
    "QUALITY_INTERVAL",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "RESAMPLES_KEY",
    "check_resamples",
    "resample_indices",
    "bootstrap",
    "intervals",
    "paired_intervals",
    "interval_record",
    "Statistic",
    "FrechetReplicates",
    "InceptionScoreReplicates",
    "PrecisionRecallReplicates",
    "MeanReplicates",
]

CONFIDENCE = 0.95
QUALITY_INTERVAL = "bootstrap-normal-95"  # the record's ``quality_interval``
DEFAULT_RESAMPLES = 200  # half-width known to about 1/sqrt(2 * 200) = 5 % (relative) of itself
DEFAULT_SEED = 0
MIN_RESAMPLES = 10
RESAMPLES_KEY = "quality.resamples"

#: one bootstrap statistic: resampled row indices -> {metric name: value}
Statistic = Callable[[np.ndarray], Mapping[str, float]]


def check_resamples(resamples: int) -> int:
    """``resamples`` as an int: 0 (no intervals) or at least ``MIN_RESAMPLES``; else a one-line ValueError."""
    integer = isinstance(resamples, (int, np.integer)) and not isinstance(resamples, bool)
    if not integer or not (resamples == 0 or resamples >= MIN_RESAMPLES):
        raise ValueError(
            f"{RESAMPLES_KEY} must be 0 (no intervals) or an integer >= {MIN_RESAMPLES}, got {resamples!r}"
        )
    return int(resamples)


def resample_indices(n: int, resamples: int, seed: int = DEFAULT_SEED) -> Iterator[np.ndarray]:
    """``resamples`` rows of n indices drawn from range(n) with replacement, reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, n, size=n)


def bootstrap(statistics: Sequence[Statistic], n: int, resamples: int, seed: int = DEFAULT_SEED
              ) -> dict[str, np.ndarray]:
    """Every statistic on the same ``resamples`` index rows: {metric name: replicates (array of resamples)}."""
    out: dict[str, list[float]] = {}
    for idx in resample_indices(n, resamples, seed):
        for stat in statistics:
            for name, value in stat(idx).items():
                out.setdefault(name, []).append(float(value))
    return {name: np.asarray(values) for name, values in out.items()}


def _halfwidth(replicates: np.ndarray, confidence: float = CONFIDENCE) -> float:
    return float(norm.ppf(0.5 + confidence / 2) * np.std(replicates, ddof=1))


def intervals(estimates: Mapping[str, float], replicates: Mapping[str, np.ndarray],
              confidence: float = CONFIDENCE) -> dict[str, float]:
    """``<name>_low`` / ``<name>_high`` (estimate -/+ z * sd of its replicates) for every replicated metric."""
    out = {}
    for name, reps in replicates.items():
        h = _halfwidth(reps, confidence)
        out[f"{name}_low"], out[f"{name}_high"] = estimates[name] - h, estimates[name] + h
    return out


def paired_intervals(estimates: Mapping[str, float], replicates: Mapping[str, np.ndarray],
                     base_estimates: Mapping[str, float], base_replicates: Mapping[str, np.ndarray],
                     confidence: float = CONFIDENCE) -> dict[str, float]:
    """``<name>_delta`` (run minus baseline) and its interval, from replicates drawn on the *same* indices."""
    out = {}
    for name, reps in replicates.items():
        if name not in base_replicates:
            continue
        delta = estimates[name] - base_estimates[name]
        h = _halfwidth(reps - base_replicates[name], confidence)
        out[f"{name}_delta"], out[f"{name}_delta_low"], out[f"{name}_delta_high"] = delta, delta - h, delta + h
    return out


def interval_record(resamples: int, seed: int) -> dict[str, object]:
    """What identifies the intervals of a record."""
    return {"quality_interval": QUALITY_INTERVAL, "quality_resamples": int(resamples), "quality_interval_seed": int(seed)}


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(idx, minlength=n)


# ------------------------------------------------------------------------------- the statistics


class FrechetReplicates:
    """FID (or sFID) of resampled feature rows against fixed reference statistics.

    Each replicate is computed from the resample's counts w (how often each row was
    drawn), never from copied rows: mean ``w @ X / n``, unbiased covariance
    ``(X^T diag(w) X - n m m^T) / (n - 1)``. The square-root term uses
    ``Tr((S R)^(1/2)) = sum sqrt(eig(R^(1/2) S R^(1/2)))`` (S R and R^(1/2) S R^(1/2)
    share their eigenvalues, which are real and >= 0 for S, R positive
    semi-definite), with ``R^(1/2)`` factored once: a symmetric eigenproblem per
    replicate instead of scipy's ``sqrtm``. With fewer samples than feature dimensions
    the n x n matrix ``W^(1/2) (Xc - m) R (Xc - m)^T W^(1/2)`` has the same nonzero
    eigenvalues and needs no square root of R. With every row drawn once it equals
    :func:`metrics.fid.frechet_distance` (tested). float64, on ``device``.
    """

    def __init__(self, features, ref_mu, ref_sigma, name: str = "fid", device: str | torch.device | None = None):
        x = check_features(features)
        if x.shape[0] < 2:
            raise ValueError(f"{name} replicates need at least 2 feature rows, got {x.shape[0]}")
        dev = torch.device(device if device is not None else "cpu")
        mu_r = torch.as_tensor(np.asarray(ref_mu, dtype=np.float64), device=dev)
        sigma_r = torch.as_tensor(np.asarray(ref_sigma, dtype=np.float64), device=dev)
        sigma_r = (sigma_r + sigma_r.T) / 2
        self.name, self.n, self.device = name, x.shape[0], dev
        xc = torch.from_numpy(x).to(dev) - mu_r  # centred on the reference mean: the mean term is |m|^2
        self.gram = self.n < x.shape[1]
        with torch.no_grad(), no_tf32():
            if self.gram:  # rank <= n: work with the n x n matrix  Xc R Xc^T  (no square root of R needed)
                self.y = xc @ sigma_r @ xc.T
            else:
                evals, vecs = torch.linalg.eigh(sigma_r)
                self.y = xc @ ((vecs * evals.clamp_min(0).sqrt()) @ vecs.T)  # rows of Xc R^(1/2)
        self.xc, self.sq = xc, (xc * xc).sum(dim=1)
        self.trace_r = float(torch.trace(sigma_r))

    def value(self, counts: np.ndarray) -> float:
        n = self.n
        w = torch.as_tensor(counts, dtype=torch.float64, device=self.device)
        with torch.no_grad(), no_tf32():
            m = w @ self.xc / n
            trace_s = (float(w @ self.sq) - n * float(m @ m)) / (n - 1)
            if self.gram:  # W^(1/2) P Xc R Xc^T P^T W^(1/2), P = I - 1 w^T / n: the resample's centred rows
                centred = self.y - (w @ self.y / n)[None, :]
                centred = centred - (centred @ w / n)[:, None]
                root = w.sqrt()
                inner = root[:, None] * centred * root[None, :] / (n - 1)
            else:
                nu = w @ self.y / n
                inner = (self.y.T @ (w[:, None] * self.y) - n * torch.outer(nu, nu)) / (n - 1)
            eig = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0)
            return float(m @ m) + trace_s + self.trace_r - 2.0 * float(eig.sqrt().sum())

    def __call__(self, idx: np.ndarray) -> dict[str, float]:
        return {self.name: self.value(_counts(idx, self.n))}


class InceptionScoreReplicates:
    """Inception Score of resampled rows of class probabilities, split as the value itself was
    (consecutive splits of ``split_size`` over the resampled order, :func:`metrics.isc.inception_score`)."""

    def __init__(self, probs, split_size: int, name: str = "is_mean"):
        self.probs, self.split_size, self.name = check_features(probs, "class probabilities"), split_size, name

    def __call__(self, idx: np.ndarray) -> dict[str, float]:
        return {self.name: inception_score(self.probs[idx], self.split_size)[0]}


class MeanReplicates:
    """The mean of resampled per-sample values (the CLIP score)."""

    def __init__(self, values, name: str):
        self.values, self.name = np.asarray(values, dtype=np.float64).ravel(), name

    def __call__(self, idx: np.ndarray) -> dict[str, float]:
        return {self.name: float(self.values[idx].mean())}


class PrecisionRecallReplicates:
    """Precision and recall (:func:`metrics.prc.precision_recall`) of resampled fake rows, the real
    manifold fixed; each replicate equals ``precision_recall(real, fake[idx])`` (tested) without
    recomputing a distance.

    * Precision is the mean of a per-fake-sample indicator (inside the fixed real manifold),
      computed once.
    * Recall needs the fake manifold of the resample: the radius of a drawn point is its k-th
      nearest neighbour among the drawn rows, copies included (a point drawn m times has m - 1
      neighbours at distance 0). It is read off each point's ``neighbours`` nearest other
      points (found once, in blocks); a point needing more is recomputed exactly. A real point
      is covered when a drawn fake point's ball holds it; the candidate (real, fake) pairs are
      those within the largest radius a fake point can get from its list, kept once.

    Cost: one pass like :func:`~metrics.prc.precision_recall`, then O(n * neighbours + pairs)
    per replicate.
    """

    def __init__(self, real_features, fake_features, k: int = 3, neighbours: int = 32, batch_size: int = 2048,
                 device: str | torch.device | None = None):
        from metrics.prc import _blocks, _sq_dists, manifold_radii

        real = check_features(real_features, "real features")
        fake = check_features(fake_features, "fake features")
        if real.shape[1] != fake.shape[1]:
            raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}")
        n = len(fake)
        if min(len(real), n) <= k:
            raise ValueError(f"precision/recall with k={k} need more than {k} real and fake samples")
        self.k, self.n, self.n_real = k, n, len(real)
        self.n_neighbours = kk = min(max(neighbours, k), n - 1)
        dev = torch.device(device if device is not None else "cpu")
        centre = real.mean(axis=0)  # as precision_recall: distances after this translation
        real_t = torch.from_numpy(real - centre).to(device=dev, dtype=torch.float64)
        fake_t = torch.from_numpy(fake - centre).to(device=dev, dtype=torch.float64)
        real_sq, fake_sq = (real_t * real_t).sum(dim=1), (fake_t * fake_t).sum(dim=1)
        nb_d = torch.empty((n, kk), dtype=torch.float64, device=dev)
        nb_i = torch.empty((n, kk), dtype=torch.long, device=dev)
        fake_in_real = torch.zeros(n, dtype=torch.bool, device=dev)
        with torch.no_grad(), no_tf32():
            real_radii = manifold_radii(real_t, k, batch_size)
            for rows in _blocks(n, batch_size):  # the kk nearest *other* fake points of each fake point
                best_d = best_i = None
                for cols in _blocks(n, batch_size):
                    d = _sq_dists(fake_t[rows], fake_sq[rows], fake_t[cols], fake_sq[cols])
                    if rows == cols:
                        d.fill_diagonal_(float("inf"))
                    ids = torch.arange(cols.start, cols.stop, device=dev).expand(d.shape[0], -1)
                    if best_d is not None:
                        d, ids = torch.cat([best_d, d], dim=1), torch.cat([best_i, ids], dim=1)
                    best_d, pos = torch.topk(d, min(kk, d.shape[1]), dim=1, largest=False)
                    best_i = torch.gather(ids, 1, pos)
                nb_d[rows], nb_i[rows] = best_d, best_i
            reach = nb_d[:, -1]  # no drawn point's radius exceeds this unless it is recomputed
            pairs_r, pairs_f, pairs_d = [], [], []
            for f in _blocks(n, batch_size):
                for r in _blocks(len(real), batch_size):
                    d = _sq_dists(fake_t[f], fake_sq[f], real_t[r], real_sq[r])
                    fake_in_real[f] |= (d <= real_radii[None, r]).any(dim=1)
                    fi, ri = torch.nonzero(d <= reach[f, None], as_tuple=True)
                    pairs_f.append(fi + f.start), pairs_r.append(ri + r.start), pairs_d.append(d[fi, ri])
        self.fake_in_real = fake_in_real.cpu().numpy()
        self.nb_d, self.nb_i = nb_d.cpu().numpy(), nb_i.cpu().numpy()
        self.pairs_r, self.pairs_f = torch.cat(pairs_r).cpu().numpy(), torch.cat(pairs_f).cpu().numpy()
        self.pairs_d = torch.cat(pairs_d).cpu().numpy()
        self._real, self._fake, self._real_sq, self._fake_sq = real_t, fake_t, real_sq, fake_sq
        self.recomputed = 0  # points whose radius needed more than their neighbour list (diagnostics)

    def _radii(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared radius of every fake point in the resample (inf where not drawn), and the points
        whose radius lies beyond their neighbour list."""
        need = self.k - (counts - 1)  # drawn copies of the point itself are its first neighbours
        cum = np.cumsum(counts[self.nb_i], axis=1)
        pos = (cum < need[:, None]).sum(axis=1)  # first position where enough neighbours are drawn
        beyond = (counts > 0) & (need > 0) & (pos >= self.n_neighbours)
        radii = np.where(need <= 0, 0.0, self.nb_d[np.arange(self.n), np.minimum(pos, self.n_neighbours - 1)])
        return np.where(counts > 0, radii, np.inf), np.flatnonzero(beyond)

    def __call__(self, idx: np.ndarray) -> dict[str, float]:
        from metrics.prc import _sq_dists

        counts = _counts(idx, self.n)
        radii, beyond = self._radii(counts)
        covered = np.zeros(self.n_real, dtype=bool)
        ok = radii[self.pairs_f] >= self.pairs_d  # inf for points not drawn never matches
        ok &= counts[self.pairs_f] > 0
        covered[self.pairs_r[ok]] = True
        if len(beyond):  # rare: recompute those points' radii and balls exactly
            self.recomputed += len(beyond)
            drawn = torch.as_tensor(np.flatnonzero(counts), device=self._fake.device)
            mult = torch.as_tensor(counts[counts > 0], device=self._fake.device)
            b = torch.as_tensor(beyond, device=self._fake.device)
            with torch.no_grad(), no_tf32():
                d = _sq_dists(self._fake[b], self._fake_sq[b], self._fake[drawn], self._fake_sq[drawn])
                d[drawn[None, :] == b[:, None]] = 0.0  # a point is at distance 0 from itself
                rep = torch.repeat_interleave(d, mult, dim=1)  # each drawn point as often as it was drawn
                r = torch.topk(rep, self.k + 1, dim=1, largest=False).values[:, self.k]
                dr = _sq_dists(self._fake[b], self._fake_sq[b], self._real, self._real_sq)
                covered |= (dr <= r[:, None]).any(dim=0).cpu().numpy()
        return {"precision": float(self.fake_in_real[idx].mean()), "recall": float(covered.mean())}
