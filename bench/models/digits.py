"""scikit-learn digits as a tiny image data set for the embedded default model.

The harness cannot reach a model hub, so it ships a small DDPM trained on the
scikit-learn ``load_digits`` data (1,797 greyscale 8x8 images, values 0..16).
This module turns that data into the layout the rest of the harness uses.

Images
    ``load_digits_images(split)`` returns ``uint8`` arrays of shape
    ``N x 16 x 16 x 1`` (NHWC, the layout of the ADM evaluator).  Each 8x8 image
    is divided by 16 (to [0, 1]), upscaled to 16x16 with
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
    multiplied by 255 and rounded half-to-even (``torch.round``).  Bilinear
    interpolation of values in [0, 1] stays in [0, 1], so no clipping happens.

Split
    A plain seeded permutation, fixed forever: ``numpy.random.default_rng(0)
    .permutation(1797)``; its first 300 indices are the ``"test"`` split and the
    remaining 1,497 the ``"train"`` split.  Inside each split the images keep
    the original ``load_digits`` order (indices sorted ascending).  ``"all"``
    returns all 1,797 images in the original order.

Model space
    ``to_model_space`` maps uint8 NHWC images to float32 NCHW tensors in
    [-1, 1] (``x / 127.5 - 1``); ``to_uint8`` maps model outputs back (clamp to
    [-1, 1], ``(x + 1) * 127.5``, round, uint8, NHWC).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.images import to_model_space, to_uint8  # noqa: F401  (re-exported)

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "N_TEST",
    "SPLIT_SEED",
    "SPLITS",
    "load_digits_images",
    "load_digits_labels",
    "split_indices",
    "to_model_space",
    "to_uint8",
]

IMAGE_SIZE = 16
NUM_CLASSES = 10
N_TOTAL = 1797
N_TEST = 300
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    labels = np.asarray(d.target, dtype=np.int64)
    if images.shape != (N_TOTAL, 8, 8):
        raise RuntimeError(f"unexpected sklearn digits shape {images.shape}")
    return images, labels


@lru_cache(maxsize=1)
def _upscaled_all() -> np.ndarray:
    images, _ = _raw()
    x = torch.from_numpy(images / 16.0).to(torch.float32)[:, None]  # N,1,8,8
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    out = x.permute(0, 2, 3, 1).contiguous().numpy()  # N,16,16,1
    out.setflags(write=False)
    return out


def split_indices(split: str) -> np.ndarray:
    """Indices into ``sklearn.datasets.load_digits()`` for ``split`` (sorted)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return np.arange(N_TOTAL)
    perm = np.random.default_rng(SPLIT_SEED).permutation(N_TOTAL)
    idx = perm[:N_TEST] if split == "test" else perm[N_TEST:]
    return np.sort(idx)


def load_digits_images(split: str) -> np.ndarray:
    """uint8 images ``N x 16 x 16 x 1`` (NHWC) of ``split`` ("train", "test", "all")."""
    return _upscaled_all()[split_indices(split)].copy()


def load_digits_labels(split: str) -> np.ndarray:
    """int64 labels 0..9, aligned with :func:`load_digits_images`."""
    _, labels = _raw()
    return labels[split_indices(split)].copy()


__all__ = [
    "load_digits_images", "load_digits_labels", "split_indices", "to_model_space", "to_uint8",
]
