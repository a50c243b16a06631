"""Shared input checks and helpers of metrics/features.py."""

import numpy as np
import pytest
import torch

from metrics.features import check_features, check_images, hub_offline, iter_batches, no_tf32


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32), r"dtype uint8, got float32 \(floats in \[0, 1\]\?"),
        (np.zeros((2, 8, 8, 3), np.int64), "dtype uint8, got int64"),
        (np.zeros((2, 3, 8, 8), np.uint8), "looks like N x C x H x W"),
        (np.zeros((2, 8, 8, 4), np.uint8), "1 or 3 channels"),
        (np.zeros((8, 8, 3), np.uint8), "4-D N x H x W x C, got 3-D"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
        ([[[[0, 0, 0]]]], "numpy uint8 array"),
    ],
)
def test_bad_images_raise_one_line(images, match):
    with pytest.raises(ValueError, match=match) as err:
        check_images(images)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("channels", [1, 3])
def test_good_images_pass_through(channels):
    images = np.zeros((2, 5, 7, channels), np.uint8)
    assert check_images(images) is images


def test_check_features_converts_and_rejects_nan():
    out = check_features(torch.ones(3, 2, dtype=torch.float32))
    assert out.dtype == np.float64 and out.shape == (3, 2)
    with pytest.raises(ValueError, match="pool features contain NaN or inf in 1 of 3 rows"):
        check_features(np.array([[0.0], [np.nan], [1.0]]), "pool features")
    with pytest.raises(ValueError, match="2-D"):
        check_features(np.ones(3))


def test_iter_batches_covers_the_range():
    assert [(s.start, s.stop) for s in iter_batches(10, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert [(s.start, s.stop) for s in iter_batches(3, 4, progress=True)] == [(0, 3)]
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(3, 0))


@pytest.mark.parametrize("value, expected", [("1", True), ("TRUE", True), ("0", False), ("", False)])
def test_hub_offline_reads_the_huggingface_variable(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is expected


def test_no_tf32_restores_the_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
