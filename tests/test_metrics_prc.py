"""Precision/recall (k-NN manifolds) against geometry, brute force and torch-fidelity."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from metrics.prc import manifold_radii, precision_recall


def _brute_force(real, fake, k):
    """Full distance matrices with scipy: an independent implementation of the same definition."""
    r_real = np.sort(cdist(real, real), axis=1)[:, k]
    r_fake = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(fake, real)
    return float((d <= r_real[None]).any(1).mean()), float((d <= r_fake[:, None]).any(0).mean())


def test_fake_inside_real_manifold_has_full_precision():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    fake = real[rng.choice(400, 100, replace=False)] + rng.normal(scale=1e-3, size=(100, 8))
    precision, _ = precision_recall(real, fake)
    assert precision == 1.0


def test_fake_on_small_part_of_real_high_precision_low_recall():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(500, 4))
    core = real[np.linalg.norm(real, axis=1) < 1.0]
    fake = core[rng.integers(0, len(core), 300)] + rng.normal(scale=0.05, size=(300, 4))
    precision, recall = precision_recall(real, fake)
    assert precision > 0.9 and recall < 0.3


def test_separated_clusters_score_zero():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(100, 3))
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_identical_sets_score_one():
    real = np.random.default_rng(3).normal(size=(80, 5))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_agrees_with_torch_fidelity_and_brute_force(k):
    from torch_fidelity.metric_prc import calculate_precision_recall_full, calculate_precision_recall_part

    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(loc=0.3, scale=1.2, size=(250, 16))
    ours = precision_recall(real, fake, k=k, batch_size=64)
    # torch-fidelity convention: features_1 = generated, features_2 = real
    full = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), neighborhood=k)
    part = calculate_precision_recall_part(
        torch.from_numpy(fake), torch.from_numpy(real), neighborhood=k, batch_size=50
    )
    assert ours == _brute_force(real, fake, k)
    # torch-fidelity averages the 0/1 decisions in float32
    np.testing.assert_allclose(ours, full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours, part, rtol=0, atol=1e-6)
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0  # a non-trivial case


def test_block_size_does_not_change_the_result():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(130, 6)), rng.normal(0.2, 1.1, size=(170, 6))
    results = {precision_recall(real, fake, batch_size=b) for b in (2, 7, 64, 1000)}
    assert len(results) == 1


def test_manifold_radii_match_sorted_distances():
    x = np.random.default_rng(5).normal(size=(57, 3))
    radii = manifold_radii(torch.from_numpy(x), k=3, batch_size=10).numpy()
    np.testing.assert_allclose(radii, np.sort(cdist(x, x) ** 2, axis=1)[:, 3], rtol=1e-10, atol=1e-12)


def test_large_offset_features_keep_exact_decisions():
    """A common offset of 1e4 would wreck float32 expansion; centring + float64 keeps the brute-force answer."""
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(120, 8)), rng.normal(0.1, 1.0, size=(90, 8))
    assert precision_recall(real + 1e4, fake + 1e4) == _brute_force(real, fake, 3)


@pytest.mark.parametrize(
    "real, fake, match",
    [
        (np.ones((10, 3)), np.ones((10, 4)), "differ in width"),
        (np.ones((3, 3)), np.ones((10, 3)), "more than 3"),
        (np.full((10, 3), np.nan), np.ones((10, 3)), "real features contain NaN"),
    ],
)
def test_bad_features_raise_one_line(real, fake, match):
    with pytest.raises(ValueError, match=match) as err:
        precision_recall(real, fake)
    assert "\n" not in str(err.value)


def test_a_point_exactly_on_a_ball_boundary_is_inside():
    """Ties count as inside: ``distance <= radius`` (Kynkäänniemi et al. 2019; ADM's ManifoldEstimator).

    Integer coordinates with integer means keep every squared distance exact in float64.
    Real points 0..4 on a line (k = 3): the balls around 0 and 4 have radius 3, the inner
    ones radius 2. The fake points -3 and 7 lie exactly on the outer balls' boundaries and
    in no other ball; the other fakes are far away. Swapping the two sets puts the same
    tie on the recall side.
    """
    real = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0]], dtype=np.float64)
    fake = np.array([[-3, 0], [7, 0], [50, 0], [51, 0], [52, 0], [53, 0]], dtype=np.float64)
    # the geometry, in exact integer arithmetic
    sq = lambda a, b: int(((a - b) ** 2).sum())  # noqa: E731
    radii = [sorted(sq(r, q) for q in real)[3] for r in real]
    assert radii == [9, 4, 4, 4, 9]
    assert sq(fake[0], real[0]) == radii[0] and sq(fake[1], real[4]) == radii[4]
    assert all(sq(f, r) > rad for f in fake[:2] for r, rad in zip(real[1:4], radii[1:4]))

    np.testing.assert_array_equal(
        manifold_radii(torch.from_numpy(real - real.mean(axis=0)), k=3, batch_size=2).numpy(), radii
    )
    # every real point lies in the first fake's (large) ball; exactly two of six fakes touch the real manifold
    assert precision_recall(real, fake) == (2 / 6, 1.0)
    assert precision_recall(fake, real) == (1.0, 2 / 6)
    assert _brute_force(real, fake, 3) == (2 / 6, 1.0)
