"""The one entry point for image-quality metrics: ``quality_metrics(fake, reference, extractor)``.

The protocol is the ADM evaluator's (openai/guided-diffusion
``evaluations/evaluator.py``): FID on "pool" features against the reference
statistics, sFID on "spatial" features, IS on softmax("logits") in consecutive
splits of 5000, precision/recall with k = 3 against the first 10k reference
images.  Results are labelled ``protocol = "adm/<extractor.name>"`` so tables
never mix numbers from different feature extractors.  The code never asks which
extractor it runs; it only reads the keys the extractor returns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from metrics.features import FeatureExtractor, check_images
from metrics.fid import frechet_distance, spatial_frechet_distance, statistics
from metrics.isc import IS_SPLIT_SIZE, check_split_size, inception_score, probabilities
from metrics.prc import PRC_K, precision_recall
from metrics.reference import PR_REFERENCE_COUNT, as_reference

__all__ = ["quality_metrics", "FeatureQuality", "METRICS", "protocol_name"]

METRICS = ("fid", "sfid", "is", "precision", "recall")


def protocol_name(extractor: FeatureExtractor) -> str:
    return f"adm/{extractor.name}"


def quality_metrics(
    fake_images: np.ndarray,
    reference,
    extractor: FeatureExtractor,
    *,
    metrics: Iterable[str] = METRICS,
    is_split_size: int = IS_SPLIT_SIZE,
    k: int = PRC_K,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    device: str | None = None,
) -> dict:
    """FID / sFID / IS / precision / recall of uint8 N x H x W x C ``fake_images`` against ``reference``.

    ``reference``: a :class:`metrics.reference.Reference`, a uint8 image array,
    or a path (ADM ``.npz``, statistics ``.npz``, image folder).  Fake features
    are extracted once; missing reference quantities are computed in one pass
    and cached under ``cache_dir`` (no disk cache when None).  ``device`` is
    where the precision/recall distances run (CPU when None).

    Returns a flat dict with the requested metrics among ``fid, sfid, is_mean,
    is_std, precision, recall`` (``sfid`` only when the extractor gives
    "spatial" features), ``protocol``, ``n_fake``, ``reference_sha256`` (the
    reference's content hash, :meth:`metrics.reference.Reference.content_hash`: which
    reference statistics the numbers are against) and the settings of the requested
    metrics (``is_split_size``, ``prc_k``).
    """
    wanted = set(metrics)
    unknown = wanted - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(METRICS)}")
    fake_images = check_images(fake_images)
    if "is" in wanted:
        check_split_size(len(fake_images), is_split_size)  # fail before the expensive extraction
    reference = as_reference(reference)

    fake = extractor.extract(fake_images, batch_size=batch_size, progress=progress)
    want_pr = bool(wanted & {"precision", "recall"})
    layers = (["pool"] if "fid" in wanted else []) + (["spatial"] if "sfid" in wanted and "spatial" in fake else [])
    ref = reference.resolve(
        extractor,
        layers=layers,
        pr_count=PR_REFERENCE_COUNT if want_pr else 0,
        cache_dir=cache_dir,
        batch_size=batch_size,
        progress=progress,
    )

    out: dict = {"protocol": protocol_name(extractor), "n_fake": int(len(fake_images)),
                 "reference_sha256": reference.content_hash()}
    if "fid" in wanted:
        out["fid"] = frechet_distance(*statistics(fake["pool"]), *ref.stats["pool"])
    if "spatial" in ref.stats:
        out["sfid"] = spatial_frechet_distance(fake["spatial"], *ref.stats["spatial"])
    if "is" in wanted:
        out["is_mean"], out["is_std"] = inception_score(probabilities(fake["logits"]), is_split_size)
        out["is_split_size"] = int(is_split_size)
    if want_pr:
        precision, recall = precision_recall(ref.pr_features, fake["pool"], k=k, device=device)
        out.update({name: value for name, value in (("precision", precision), ("recall", recall)) if name in wanted})
        out["prc_k"] = int(k)
    return out


class FeatureQuality:
    """FID / sFID / IS / precision / recall of a run (``conf/quality/adm_*.yaml``), ADM protocol;
    a :class:`metrics.quality.QualityEvaluator`.

    ``reference`` is the reference batch (anything :func:`metrics.reference.as_reference`
    takes); when it is None the model's own ``default_reference`` is used. Both the
    reference and the extractor are opened here, so a missing or unreadable file
    fails before any image is generated. ``quality(images)`` returns the dict of
    :func:`quality_metrics`.
    """

    needs_prompts = False

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference=None,
        *,
        default_reference=None,
        which: Iterable[str] = METRICS,
        is_split_size: int = IS_SPLIT_SIZE,
        k: int = PRC_K,
        batch_size: int = 64,
        cache_dir: str | os.PathLike | None = None,
        device: str | None = None,
        progress: bool = False,
    ):
        self.which = tuple(which)
        unknown = set(self.which) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)} in `which`; valid: {', '.join(METRICS)}")
        if reference is None:
            reference = default_reference
        if reference is None:
            raise ValueError("a reference batch is needed (metrics.reference: ADM .npz with arr_0, "
                             "an .npz of mu/sigma, or an image folder)")
        self.reference = as_reference(reference)
        self.extractor = extractor
        self.is_split_size, self.k, self.batch_size = int(is_split_size), int(k), int(batch_size)
        self.cache_dir, self.device, self.progress = cache_dir, device, progress

    def check_samples(self, num_samples: int) -> None:
        """IS needs at least one whole split (:class:`metrics.quality.QualityEvaluator`)."""
        if "is" in self.which and num_samples < self.is_split_size:
            raise ValueError(
                f"{num_samples} images are fewer than quality.is_split_size={self.is_split_size} (Inception Score "
                "splits; ADM: 5000): lower quality.is_split_size or drop 'is' from quality.which"
            )

    def __call__(self, images: np.ndarray, prompts=None) -> dict:
        return quality_metrics(
            images, self.reference, self.extractor, metrics=self.which, is_split_size=self.is_split_size,
            k=self.k, batch_size=self.batch_size, cache_dir=self.cache_dir, progress=self.progress,
            device=self.device,
        )
