"""Inception extractor plumbing (pool3 / unbiased logits / ADM sFID tensor) on random weights, offline.

Real weights cannot be downloaded here: the tests build torch-fidelity's network
with random Kaiming weights saved to a tmp file and passed as
``feature_extractor_weights_path``.  Image counts are tiny (~0.2 s per image on CPU).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics.features import MissingWeightsError
from metrics.inception import (
    INCEPTION_WEIGHTS_URL,
    InceptionV3Extractor,
    resolve_inception_weights,
    save_random_inception_weights,
)

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0)


@pytest.fixture(scope="module")
def extractor(weights):
    return InceptionV3Extractor(weights, device="cpu")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)


@pytest.mark.integration
def test_one_pass_gives_all_three_layers(extractor, images):
    feats = extractor.extract(images)
    assert {k: v.shape for k, v in feats.items()} == {"pool": (2, 2048), "logits": (2, 1008), "spatial": (2, 2023)}
    assert all(v.dtype == np.float64 for v in feats.values())


def test_spatial_is_relu_bn_conv_of_mixed_6d_branch1x1_in_nhwc_order(extractor, images):
    """ADM mixed_6/conv:0 is the ReLU output of the layer (after batch-norm), 7 channels, NHWC-flattened."""
    branch = extractor.model.Mixed_6d.branch1x1
    conv_out = []
    handle = branch.conv.register_forward_hook(lambda _m, _i, out: conv_out.append(out.clone()))
    try:
        feats = extractor.extract(images)
    finally:
        handle.remove()
    expected = F.relu(branch.bn(conv_out[0]))[:, :7].permute(0, 2, 3, 1).reshape(2, -1).double().numpy()
    np.testing.assert_allclose(feats["spatial"], expected, rtol=1e-6, atol=1e-6)
    assert feats["spatial"].min() >= 0.0 and (feats["spatial"] == 0).any()  # ReLU applied
    assert not np.allclose(feats["spatial"], conv_out[0][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy())


def test_logits_are_unbiased_pool3_times_fc_weight(extractor, images):
    feats = extractor.extract(images)
    weight = extractor.model.fc.weight.double().numpy()
    bias = extractor.model.fc.bias.double().numpy()
    np.testing.assert_allclose(feats["logits"], feats["pool"] @ weight.T, rtol=1e-5, atol=1e-6)
    assert np.abs(bias).max() > 1e-3  # so the biased logits would differ


@pytest.mark.integration
def test_local_patch_moves_spatial_features_locally_and_pool3_little(extractor, images):
    changed = images.copy()
    changed[:, :8, :8] = 255 - changed[:, :8, :8]  # top-left quarter of each side
    a, b = extractor.extract(images), extractor.extract(changed)

    def rel(key):
        return np.linalg.norm(a[key] - b[key]) / np.linalg.norm(a[key])

    assert rel("spatial") > 3 * rel("pool") > 0
    delta = np.abs(a["spatial"] - b["spatial"]).reshape(2, 17, 17, 7)  # h, w, c
    assert delta[:, :8, :8].sum() > 10 * delta[:, 9:, 9:].sum()


def test_grey_images_are_repeated_to_rgb(extractor):
    grey = np.random.default_rng(1).integers(0, 256, size=(1, 24, 24, 1), dtype=np.uint8)
    ours, rgb = extractor.extract(grey), extractor.extract(np.repeat(grey, 3, axis=-1))
    for key in ours:
        np.testing.assert_array_equal(ours[key], rgb[key])


@pytest.mark.integration
def test_batch_size_does_not_change_features(extractor, images):
    one, both = extractor.extract(images, batch_size=1), extractor.extract(images, batch_size=2)
    for key in one:
        np.testing.assert_allclose(one[key], both[key], rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_cache_id_tracks_the_weights(extractor, weights, tmp_path):
    other = InceptionV3Extractor(save_random_inception_weights(tmp_path / "other.pth", seed=1), device="cpu")
    assert extractor.cache_id.startswith("inception-v3-compat@")
    assert extractor.cache_id != other.cache_id
    assert extractor.cache_id == InceptionV3Extractor(weights, device="cpu").cache_id


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def _assert_one_line_naming_key(err):
    message = str(err.value)
    assert "\n" not in message and "metrics.inception_weights" in message and WEIGHTS_FILE in message


def test_offline_without_weights_fails_at_once_in_one_line(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE") as err:
        InceptionV3Extractor(device="cpu")
    _assert_one_line_naming_key(err)
    assert INCEPTION_WEIGHTS_URL in str(err.value)


def test_failed_download_fails_in_one_line(empty_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(MissingWeightsError, match="could not be downloaded") as err:
        resolve_inception_weights()
    _assert_one_line_naming_key(err)


def test_missing_local_path_names_the_key(tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist") as err:
        resolve_inception_weights(tmp_path / "nope.pth")
    _assert_one_line_naming_key(err)


def test_weights_in_the_hub_cache_are_used(empty_hub, weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = empty_hub / "checkpoints" / WEIGHTS_FILE
    cached.parent.mkdir()
    cached.write_bytes(open(weights, "rb").read())
    assert resolve_inception_weights() == str(cached)
