"""Inception Score against closed forms and torch-fidelity."""

import numpy as np
import pytest
import torch

from metrics.isc import inception_score, probabilities


def _confident(labels, num_classes):
    return np.eye(num_classes)[labels]


def test_uniform_predictions_score_one():
    mean, std = inception_score(np.full((20, 10), 0.1), split_size=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [2, 7, 1008])
def test_confident_balanced_predictions_score_num_classes(num_classes):
    probs = _confident(np.arange(3 * num_classes) % num_classes, num_classes)
    mean, _ = inception_score(probs, split_size=len(probs))
    assert mean == pytest.approx(num_classes, rel=1e-12)


def test_consecutive_splits_without_shuffle():
    """Split 1 is balanced over 2 classes (IS 2), split 2 over 4 classes (IS 4): mean 3, std 1."""
    probs = np.concatenate([_confident(np.arange(8) % 2, 4), _confident(np.arange(8) % 4, 4)])
    mean, std = inception_score(probs, split_size=8)
    assert (mean, std) == (pytest.approx(3.0), pytest.approx(1.0))


def test_short_last_split_is_scored_like_adm():
    """ADM loops ``range(0, n, split_size)``: 10 samples with split 8 -> splits of 8 and 2."""
    probs = np.concatenate([_confident(np.arange(8) % 4, 4), _confident(np.array([0, 1]), 4)])
    mean, std = inception_score(probs, split_size=8)
    assert (mean, std) == (pytest.approx(3.0), pytest.approx(1.0))


def test_zero_probabilities_do_not_give_nan():
    probs = _confident(np.arange(6) % 3, 3)  # exact zeros: 0 * log 0 -> 0
    assert np.isfinite(inception_score(probs, split_size=6)).all()


def test_agrees_with_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(0).normal(scale=3.0, size=(60, 12))
    ours = inception_score(probabilities(logits), split_size=20)
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=3, shuffle=False)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-8)


def test_fewer_samples_than_split_size_names_the_setting():
    match = r"at least 5000 samples per split, got 100; lower metrics\.is_split_size"
    with pytest.raises(ValueError, match=match) as err:
        inception_score(np.full((100, 10), 0.1))
    assert "\n" not in str(err.value)


def test_logits_instead_of_probabilities_are_rejected():
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.random.default_rng(0).normal(size=(10, 5)), split_size=5)
