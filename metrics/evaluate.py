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

from metrics.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    FrechetReplicates,
    InceptionScoreReplicates,
    PrecisionRecallReplicates,
    bootstrap,
    check_resamples,
    interval_record,
    intervals,
    paired_intervals,
)
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
    resamples: int = 0,
    seed: int = DEFAULT_SEED,
) -> dict:
    """FID / sFID / IS / precision / recall of uint8 N x H x W x C ``fake_images`` against ``reference``.

    ``reference``: a :class:`metrics.reference.Reference`, a uint8 image array,
    or a path (ADM ``.npz``, statistics ``.npz``, image folder).  Fake features
    are extracted once; missing reference quantities are computed in one pass
    and cached under ``cache_dir`` (no disk cache when None).  ``device`` is
    where the precision/recall distances run (CPU when None).

    Returns a flat dict with the requested metrics among ``fid, sfid, is_mean,
    is_std, precision, recall`` (``sfid`` only when the extractor gives
    "spatial" features), ``protocol``, ``n_fake``, ``reference_sha256`` (the reference's content hash,
    :meth:`metrics.reference.Reference.content_hash`) and the settings of the
    requested metrics (``is_split_size``, ``prc_k``).  With ``resamples`` > 0
    each metric but ``is_std`` also has ``<metric>_low`` / ``<metric>_high``, its
    95 % bootstrap interval over the fake samples (:mod:`metrics.bootstrap`).
    """
    quality = FeatureQuality(extractor, reference, which=metrics, is_split_size=is_split_size, k=k,
                             batch_size=batch_size, cache_dir=cache_dir, device=device, progress=progress,
                             resamples=resamples, interval_seed=seed)
    return quality(fake_images)


def _ordered(out: dict) -> dict:
    """Each metric followed by its interval and its paired difference (the table's column order)."""
    suffixes = ("_low", "_high", "_delta", "_delta_low", "_delta_high")
    extra = {k for k in out if any(k.endswith(s) and k[: -len(s)] in out for s in suffixes)}
    ordered = {}
    for key, value in out.items():
        if key in extra:
            continue
        ordered[key] = value
        ordered.update({key + s: out[key + s] for s in suffixes if key + s in out})
    return {**ordered, **{k: v for k, v in out.items() if k not in ordered}}


class FeatureQuality:
    """FID / sFID / IS / precision / recall of a run (``conf/quality/adm_*.yaml``), ADM protocol;
    a :class:`metrics.quality.QualityEvaluator`.

    ``reference`` is the reference batch (anything :func:`metrics.reference.as_reference`
    takes); when it is None the model's own ``default_reference`` is used. Both the
    reference and the extractor are opened here, so a missing or unreadable file
    fails before any image is generated. ``quality(images)`` returns the dict of
    :func:`quality_metrics`; ``quality.paired(images, baseline_images)`` both dicts,
    the first with the paired differences (:mod:`metrics.bootstrap`). ``resamples``
    bootstrap resamples give each metric its 95 % interval (0: none), drawn from
    ``interval_seed``.
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
        resamples: int = DEFAULT_RESAMPLES,
        interval_seed: int = DEFAULT_SEED,
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
        self.resamples, self.interval_seed = check_resamples(resamples), int(interval_seed)
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

    def _resolved(self, layers_of: dict):
        want_pr = bool(set(self.which) & {"precision", "recall"})
        layers = (["pool"] if "fid" in self.which else []) + (
            ["spatial"] if "sfid" in self.which and "spatial" in layers_of else [])
        return self.reference.resolve(
            self.extractor, layers=layers, pr_count=PR_REFERENCE_COUNT if want_pr else 0,
            cache_dir=self.cache_dir, batch_size=self.batch_size, progress=self.progress,
        )

    def _features(self, images: np.ndarray) -> dict:
        images = check_images(images)
        if "is" in self.which:
            check_split_size(len(images), self.is_split_size)  # fail before the expensive extraction
        return self.extractor.extract(images, batch_size=self.batch_size, progress=self.progress)

    def _score(self, fake: dict, ref) -> tuple[dict, list]:
        """The metrics of one set of fake features, and its bootstrap statistics (none without resamples)."""
        wanted, stats = set(self.which), []
        boot = self.resamples > 0
        out: dict = {"protocol": protocol_name(self.extractor), "n_fake": int(len(fake["pool"])),
                     "reference_sha256": self.reference.content_hash()}
        if "fid" in wanted:
            out["fid"] = frechet_distance(*statistics(fake["pool"]), *ref.stats["pool"])
            if boot:
                stats.append(FrechetReplicates(fake["pool"], *ref.stats["pool"], name="fid", device=self.device))
        if "spatial" in ref.stats:
            out["sfid"] = spatial_frechet_distance(fake["spatial"], *ref.stats["spatial"])
            if boot:
                stats.append(FrechetReplicates(fake["spatial"], *ref.stats["spatial"], name="sfid",
                                               device=self.device))
        if "is" in wanted:
            probs = probabilities(fake["logits"])
            out["is_mean"], out["is_std"] = inception_score(probs, self.is_split_size)
            out["is_split_size"] = self.is_split_size
            if boot:
                stats.append(InceptionScoreReplicates(probs, self.is_split_size))
        if wanted & {"precision", "recall"}:
            precision, recall = precision_recall(ref.pr_features, fake["pool"], k=self.k, device=self.device)
            out.update({name: value for name, value in (("precision", precision), ("recall", recall))
                        if name in wanted})
            out["prc_k"] = self.k
            if boot:
                pr = PrecisionRecallReplicates(ref.pr_features, fake["pool"], k=self.k, device=self.device)
                stats.append(lambda idx, pr=pr: {m: v for m, v in pr(idx).items() if m in wanted})
        return out, stats

    def _with_intervals(self, out: dict, reps: dict) -> dict:
        if not self.resamples:
            return out
        return _ordered({**out, **intervals(out, reps), **interval_record(self.resamples, self.interval_seed)})

    def __call__(self, images: np.ndarray, prompts=None) -> dict:
        fake = self._features(images)
        out, stats = self._score(fake, self._resolved(fake))
        reps = bootstrap(stats, out["n_fake"], self.resamples, self.interval_seed) if self.resamples else {}
        return self._with_intervals(out, reps)

    def paired(self, images: np.ndarray, baseline_images: np.ndarray, prompts=None) -> tuple[dict, dict]:
        """(measurements of ``images``, of ``baseline_images``), each as ``self(...)`` gives it; the first also
        has ``<metric>_delta`` (images minus baseline) and its interval, from the same resampled indices in both
        sets: image i and baseline image i must come from the same noise (:mod:`metrics.bootstrap`)."""
        if len(images) != len(baseline_images):
            raise ValueError(f"paired scoring needs as many images as baseline images, got {len(images)} and "
                             f"{len(baseline_images)}")
        fake, base = self._features(images), self._features(baseline_images)
        ref = self._resolved(fake)
        (out, stats), (base_out, base_stats) = self._score(fake, ref), self._score(base, ref)
        if not self.resamples:
            return out, base_out
        n = out["n_fake"]
        reps = bootstrap(stats, n, self.resamples, self.interval_seed)
        base_reps = bootstrap(base_stats, n, self.resamples, self.interval_seed)
        deltas = paired_intervals(out, reps, base_out, base_reps)
        return self._with_intervals({**out, **deltas}, reps), self._with_intervals(base_out, base_reps)
