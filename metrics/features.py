"""The feature-extractor interface shared by every metric, plus input checks.

Every quality metric in this package is a chain of small stages
(images -> features -> statistics -> number, in the manner of torch-fidelity).
This module holds the first stage's contract:

``FeatureExtractor.extract(images)`` takes uint8 ``N x H x W x C`` images
(C = 1 or 3; the layout of the ADM evaluator's ``arr_0`` batches,
openai/guided-diffusion ``evaluations/evaluator.py``) and returns float64
arrays under named keys:

``"pool"``     N x D  features for FID and precision/recall;
``"logits"``   N x K  unnormalised logits for the Inception Score;
``"spatial"``  N x S  spatial features for sFID (optional).

The metric code never asks which extractor it runs; results are labelled with
``extractor.name`` so that numbers from different extractors are never mixed.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from metrics.errors import one_line

__all__ = [
    "INCEPTION_NAME",
    "FeatureExtractor",
    "FEATURE_KEYS",
    "MissingWeightsError",
    "check_images",
    "check_features",
    "iter_batches",
    "hub_offline",
    "no_tf32",
]

#: The keys an extractor may return ("spatial" is optional).
FEATURE_KEYS = ("pool", "logits", "spatial")

#: Name of torch-fidelity's port of the TF Inception graph (``metrics/inception.py``); also the label of
#: statistics precomputed with that graph (ADM reference batches, pytorch-fid ``.npz`` files).
INCEPTION_NAME = "inception-v3-compat"


class FeatureExtractor(abc.ABC):
    """Images -> named float64 feature arrays (see the module docstring)."""

    name: str  # e.g. "inception-v3-compat"; results are labelled with it

    @abc.abstractmethod
    def extract(self, images, batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
        """uint8 N x H x W x C images -> {"pool": N x D, "logits": N x K[, "spatial": N x S]} (float64)."""

    @property
    def cache_id(self) -> str:
        """What identifies this extractor's output in on-disk caches.

        Defaults to ``name``; an extractor whose weights can vary under one name
        (the Inception port with a user-supplied file) adds a weights digest.
        """
        return self.name


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable (one-line message)."""


def check_images(images) -> np.ndarray:
    """Validate a uint8 N x H x W x C (C in 1, 3) image batch; raise a one-line ValueError otherwise."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy uint8 array N x H x W x C, got {type(images).__name__}")
    if images.dtype != np.uint8:
        hint = " (floats in [0, 1]? convert with (x * 255).round().clip(0, 255).astype(np.uint8))"
        hint = hint if images.dtype.kind == "f" else ""
        raise ValueError(f"images must have dtype uint8, got {images.dtype}{hint}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D N x H x W x C, got {images.ndim}-D shape {images.shape}")
    n, h, w, c = images.shape
    if c not in (1, 3):
        hint = " (looks like N x C x H x W; transpose to N x H x W x C)" if images.shape[1] in (1, 3) else ""
        raise ValueError(f"images must have 1 or 3 channels in the last axis, got shape {images.shape}" + hint)
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"images are empty: shape {images.shape}")
    return images


def check_features(features, what: str = "features") -> np.ndarray:
    """Features (numpy or torch, N x D) -> float64 numpy; one-line ValueError on bad shape or NaN/inf."""
    if hasattr(features, "detach"):  # torch tensor
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{what} must be 2-D N x D, got shape {features.shape}")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise ValueError(f"{what} contain NaN or inf in {bad} of {features.shape[0]} rows")
    return features


def iter_batches(n: int, batch_size: int, progress: bool = False, desc: str = "features") -> Iterator[slice]:
    """Consecutive slices ``[s, s + batch_size)`` covering ``range(n)``, with an optional tqdm bar."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", total=len(starts))
    for s in starts:
        yield slice(s, min(s + batch_size, n))


def hub_offline() -> bool:
    """True when the environment forbids downloads (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local_weights(what: str, url: str, cached: Path, config_key: str, path: str | os.PathLike | None = None, *,
                  progress: bool = False, hash_prefix: str | None = None) -> str:
    """Local file of downloadable weights: ``path`` if given; else ``cached`` (torch hub's
    cache), downloading ``url`` into it when downloads are on (checked against
    ``hash_prefix`` when given). Otherwise a one-line :class:`MissingWeightsError` naming
    ``what``, the file, its URL and the setting ``config_key`` that takes a local copy."""
    import torch

    filename = os.path.basename(url)
    if path is not None:
        if not Path(path).expanduser().is_file():
            raise MissingWeightsError(
                f"{what} file {path} does not exist ({config_key} must point to a local copy of {filename}, "
                f"downloaded from {url})"
            )
        return str(Path(path).expanduser())
    if cached.is_file():
        return str(cached)
    if hub_offline():
        raise MissingWeightsError(
            f"{what} {filename} are not in {cached.parent} and downloads are off (HF_HUB_OFFLINE): "
            f"fetch them from {url} and set {config_key} to the local file"
        )
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_prefix, progress=progress)
    except Exception as err:  # network errors come in many types; report them in one line
        raise MissingWeightsError(
            f"{what} {filename} could not be downloaded from {url} ({type(err).__name__}: "
            f"{one_line(err)}); set {config_key} to a local copy"
        ) from None
    return str(cached)


@contextlib.contextmanager
def no_tf32():
    """Disable TF32 in CUDA matmuls and cuDNN convolutions for the block; restore afterwards.

    TF32 keeps 10 mantissa bits: enough to move Inception features and k-NN
    decisions, so metric code runs in full float32/float64.
    """
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
