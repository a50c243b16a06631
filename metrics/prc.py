"""Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, in blocks.

The manifold of a feature set is the union of balls centred on its points, each
with radius the distance to that point's k-th nearest neighbour in the same set
(k = 3; the point itself is its 0-th neighbour).  Then

    precision = fraction of fake points inside the real manifold,
    recall    = fraction of real points inside the fake manifold,

with "inside" meaning ``distance <= radius`` of at least one ball.  This is the
convention of the ADM evaluator (``ManifoldEstimator`` in openai/guided-diffusion
``evaluations/evaluator.py``: squared Euclidean distances, ``kth = k``,
``<=``), which compares 50k samples against the 10k reference images.

Memory: distances are only ever held as ``batch_size x batch_size`` blocks; the
k-NN radii are kept as a running top-(k+1) per row, so 50k x 10k (and the 50k x
50k fake-manifold pass) never materialise a full distance matrix.

Precision: distances are computed in float64 as ``|x|^2 - 2 x.y + |y|^2`` after
subtracting the real features' mean (a translation, so distances are
unchanged, and it shrinks the norms that cancel).  For Inception pool3 features
(|x|^2 ~ 1e3) the float64 error is ~1e-12, far below the gaps between
neighbour distances, so ball-membership decisions are those of exact
arithmetic; float32 (~1e-4 absolute error) or ADM's float16 (~1) can flip
borderline decisions.  TF32 is disabled for the block.
"""

from __future__ import annotations

import torch

from metrics.features import check_features, no_tf32

__all__ = ["precision_recall", "manifold_radii", "PRC_K"]

PRC_K = 3  # Kynkäänniemi et al. 2019; ADM
_DTYPE = torch.float64


def _blocks(n: int, batch_size: int):
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows of ``a`` and ``b`` (norms precomputed), clamped at 0."""
    d = a @ b.T  # the only block-sized allocation; the rest is in place
    return d.mul_(-2.0).add_(a_sq[:, None]).add_(b_sq[None, :]).clamp_min_(0.0)


def manifold_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour within ``features`` (self = 0-th)."""
    n = features.shape[0]
    sq = (features * features).sum(dim=1)
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for rows in _blocks(n, batch_size):
        best = None  # running k+1 smallest squared distances per row
        for cols in _blocks(n, batch_size):
            d = _sq_dists(features[rows], sq[rows], features[cols], sq[cols])
            if best is not None:
                d = torch.cat([best, torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[rows] = best[:, k]
    return radii


def precision_recall(
    real_features,
    fake_features,
    k: int = PRC_K,
    batch_size: int = 2048,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """(precision, recall) of fake vs real features with k-NN manifolds (Kynkäänniemi et al. 2019; ADM convention).

    Features are N x D numpy arrays or torch tensors; ``batch_size`` bounds the
    distance blocks (``batch_size**2`` float64 values); ``device`` defaults to CPU.
    """
    real = check_features(real_features, "real features")
    fake = check_features(fake_features, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} need more than {k} real and fake samples, got {len(real)} and {len(fake)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    device = torch.device(device if device is not None else "cpu")
    centre = real.mean(axis=0)
    real_t = torch.from_numpy(real - centre).to(device=device, dtype=_DTYPE)
    fake_t = torch.from_numpy(fake - centre).to(device=device, dtype=_DTYPE)

    with torch.no_grad(), no_tf32():
        real_radii = manifold_radii(real_t, k, batch_size)
        fake_radii = manifold_radii(fake_t, k, batch_size)
        real_sq, fake_sq = (real_t * real_t).sum(dim=1), (fake_t * fake_t).sum(dim=1)
        fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)  # -> precision
        real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=device)  # -> recall
        for f in _blocks(len(fake), batch_size):
            for r in _blocks(len(real), batch_size):
                d = _sq_dists(fake_t[f], fake_sq[f], real_t[r], real_sq[r])
                fake_in_real[f] |= (d <= real_radii[None, r]).any(dim=1)
                real_in_fake[r] |= (d <= fake_radii[f, None]).any(dim=0)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())
