"""The interface of a quality evaluator: what a ``conf/quality/*.yaml`` ``_target_`` builds.

The runner instantiates the ``quality`` config with two more keywords, ``device`` (where
features and distances run) and ``progress`` (show progress bars), then calls
:meth:`~QualityEvaluator.check_samples` before any image is generated and the evaluator
itself on the generated images, or :meth:`~QualityEvaluator.paired` on a run's images and
its baseline's when both exist (sample i of both from the same noise), which adds the
differences to the baseline with their paired intervals (:mod:`metrics.bootstrap`). It
never asks which metrics an evaluator computes: the returned keys become the record's
measurements and the table's columns. Implementations:
:class:`metrics.evaluate.FeatureQuality` (FID, sFID, IS, precision, recall) and
:class:`metrics.clip_score.ClipQuality` (CLIP score).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class QualityEvaluator(Protocol):
    """Scores a run's images. Constructed as ``Target(**config, device=..., progress=...)``;
    opening weights and reference files in the constructor makes a missing file fail
    before any image is generated."""

    def check_samples(self, num_samples: int) -> None:
        """Raise ``ValueError`` (one line, naming the quality setting to change) when
        ``num_samples`` images cannot be scored, e.g. fewer than one Inception Score split."""

    def __call__(self, images: np.ndarray, prompts: Sequence[Any] | None) -> dict[str, Any]:
        """Measurements of ``images`` (uint8 N x H x W x C; ``prompts[i]`` is image ``i``'s prompt or
        class label, None for an unconditional model): a flat dict of numbers and strings,
        with a ``protocol`` naming what produced them so tables never mix protocols."""

    def paired(
        self, images: np.ndarray, baseline_images: np.ndarray, prompts: Sequence[Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(self(images, prompts), self(baseline_images, prompts))``, the first also holding
        ``<metric>_delta`` (images minus baseline) with ``<metric>_delta_low`` / ``_high``. Image ``i``
        of both sets starts from the same noise, so the bootstrap resamples the same indices in
        both (a paired interval); features are extracted once per set."""
