"""Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) || p(y))), per split.

Conventions of the ADM evaluator (openai/guided-diffusion
``evaluations/evaluator.py``, ``compute_inception_score``): probabilities are
``softmax(pool3 @ W)`` (no fc bias; see ``metrics/inception.py``), split into
*consecutive* chunks of ``split_size`` samples (5000 in ADM), no shuffling; a
last chunk shorter than ``split_size`` is scored as its own split, as ADM's
``range(0, n, split_size)`` loop does (50k samples give exactly 10 splits).
ADM reports the mean over splits; we return (mean, std) over splits.
Deviation: ``0 * log 0`` is taken as 0 (its limit) where ADM's ``p * log p``
would give NaN for an underflowed probability.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax, xlogy

from metrics.features import check_features

__all__ = ["inception_score", "probabilities", "check_split_size", "IS_SPLIT_SIZE", "SPLIT_SIZE_KEY"]

IS_SPLIT_SIZE = 5000  # ADM
SPLIT_SIZE_KEY = "metrics.is_split_size"
_SUM_ATOL = 1e-4  # rows of float32 softmax outputs sum to 1 within ~1e-6


def probabilities(logits) -> np.ndarray:
    """N x K unnormalised logits -> N x K softmax probabilities, float64."""
    return softmax(check_features(logits, "logits"), axis=1)


def check_split_size(n: int, split_size: int) -> None:
    """One-line ValueError unless ``n`` samples fill at least one split of ``split_size``."""
    if split_size < 1:
        raise ValueError(f"{SPLIT_SIZE_KEY} must be >= 1, got {split_size}")
    if n < split_size:
        raise ValueError(
            f"Inception Score needs at least {split_size} samples per split, got {n}; lower {SPLIT_SIZE_KEY}"
        )


def inception_score(probs, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) over consecutive splits of exp(mean_x KL(p(y|x) || p(y))); ``probs`` is N x C softmax output."""
    p = check_features(probs, "class probabilities")
    if (p < 0).any() or np.abs(p.sum(axis=1) - 1.0).max() > _SUM_ATOL:
        raise ValueError("class probabilities must be non-negative rows summing to 1 (pass softmax(logits))")
    n = p.shape[0]
    check_split_size(n, split_size)
    scores = []
    for start in range(0, n, split_size):
        part = p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
