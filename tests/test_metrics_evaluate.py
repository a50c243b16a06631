"""quality_metrics: the entry point, on a tiny deterministic extractor (any extractor must work)."""

import numpy as np
import pytest

from metrics.evaluate import quality_metrics
from metrics.features import FeatureExtractor
from metrics.reference import from_array


class BlockExtractor(FeatureExtractor):
    """4x4 block means of the grey image ("pool"), a fixed linear map of them ("logits"), optional "spatial"."""

    def __init__(self, name="toy-blocks", spatial=True):
        self.name, self.spatial, self.calls = name, spatial, []
        self.weight = np.random.default_rng(123).normal(scale=8.0, size=(16, 10))

    def extract(self, images, batch_size=64, progress=False):
        self.calls.append(len(images))
        grey = images.astype(np.float64).mean(axis=-1) / 255.0
        n, h, w = grey.shape
        pool = grey.reshape(n, 4, h // 4, 4, w // 4).mean(axis=(2, 4)).reshape(n, 16)
        out = {"pool": pool, "logits": (pool - 0.5) @ self.weight}
        if self.spatial:
            out["spatial"] = grey[:, :2, :3].reshape(n, 6)
        return out


def _images(seed, n, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128 + shift, 40, size=(n, 8, 8, 3)), 0, 255).astype(np.uint8)


def test_regression_pin():
    """Regression pin, not a correctness test: these numbers were computed once with this code on seeded
    synthetic images; a refactor that changes any of them fails here.  Correctness is checked against closed
    forms and independent implementations in test_metrics_{fid,isc,prc}.py."""
    result = quality_metrics(_images(0, 60, shift=6), _images(1, 80), BlockExtractor(), is_split_size=20)
    expected = {
        "fid": 0.01576209669254726,
        "sfid": 0.005320985378332838,
        "is_mean": 1.6817613975011305,
        "is_std": 0.11645906510360292,
        "precision": 38 / 60,
        "recall": 50 / 80,
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert result["protocol"] == "adm/toy-blocks"
    assert (result["n_fake"], result["is_split_size"], result["prc_k"]) == (60, 20, 3)


def test_fake_features_extracted_once_and_reference_once():
    ex = BlockExtractor()
    quality_metrics(_images(0, 30), _images(1, 40), ex, is_split_size=10)
    assert sorted(ex.calls) == [30, 40]


def test_precision_recall_use_the_first_reference_images(monkeypatch):
    from metrics import evaluate

    monkeypatch.setattr(evaluate, "PR_REFERENCE_COUNT", 25)  # 10k in the ADM protocol
    ex = BlockExtractor()
    reference = _images(1, 40)
    result = quality_metrics(_images(0, 30), reference, ex, metrics=("precision", "recall"))
    assert ex.calls == [30, 25]
    expected = quality_metrics(_images(0, 30), reference[:25], BlockExtractor(), metrics=("precision", "recall"))
    assert (result["precision"], result["recall"]) == (expected["precision"], expected["recall"])


def test_reference_equal_to_fake_is_perfect():
    images = _images(2, 50)
    result = quality_metrics(images, images.copy(), BlockExtractor(), is_split_size=25)
    assert abs(result["fid"]) < 1e-9 and abs(result["sfid"]) < 1e-9
    assert result["precision"] == result["recall"] == 1.0


def test_only_requested_metrics_are_returned():
    result = quality_metrics(_images(0, 30), _images(1, 40), BlockExtractor(), metrics=("fid", "recall"))
    assert set(result) == {"fid", "recall", "protocol", "n_fake", "reference_sha256", "prc_k"}


def test_sfid_only_when_the_extractor_gives_spatial_features():
    ex = BlockExtractor(name="no-spatial", spatial=False)
    result = quality_metrics(_images(0, 30), _images(1, 40), ex, is_split_size=10)
    assert "sfid" not in result and "fid" in result and result["protocol"] == "adm/no-spatial"


def test_reference_object_and_disk_cache(tmp_path):
    ex = BlockExtractor()
    ref = from_array(_images(1, 40))
    a = quality_metrics(_images(0, 30), ref, ex, is_split_size=10, cache_dir=tmp_path)
    b = quality_metrics(_images(0, 30), from_array(_images(1, 40)), ex, is_split_size=10, cache_dir=tmp_path)
    assert a == b and ex.calls == [30, 40, 30]


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match=r"unknown metrics \['kid'\]"):
        quality_metrics(_images(0, 10), _images(1, 10), BlockExtractor(), metrics=("fid", "kid"))


def test_too_few_samples_for_is_fail_before_extraction():
    ex = BlockExtractor()
    with pytest.raises(ValueError, match="metrics.is_split_size") as err:
        quality_metrics(_images(0, 30), _images(1, 40), ex)  # default split 5000
    assert ex.calls == [] and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "fake, match",
    [
        (np.zeros((4, 8, 8, 3), np.float32), "dtype uint8"),
        (np.zeros((4, 3, 8, 8), np.uint8), "N x C x H x W"),
        (np.zeros((8, 8, 3), np.uint8), "4-D"),
    ],
)
def test_bad_fake_images_are_refused_in_one_line(fake, match):
    with pytest.raises(ValueError, match=match) as err:
        quality_metrics(fake, _images(1, 10), BlockExtractor(), metrics=("fid",))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------ intervals and paired scoring


def _quality(ex=None, **kw):
    from metrics.evaluate import FeatureQuality

    return FeatureQuality(ex or BlockExtractor(), _images(1, 80), is_split_size=20, **kw)


def test_each_metric_has_its_interval_around_its_value_in_column_order():
    result = _quality(resamples=50)(_images(0, 60, shift=6))
    for key in ("fid", "sfid", "is_mean", "precision", "recall"):
        assert result[f"{key}_low"] <= result[key] <= result[f"{key}_high"], key
        assert result[f"{key}_low"] < result[f"{key}_high"], key
    keys = list(result)
    assert keys[keys.index("fid"):keys.index("fid") + 3] == ["fid", "fid_low", "fid_high"]
    assert (result["quality_interval"], result["quality_resamples"], result["quality_interval_seed"]) == (
        "bootstrap-normal-95", 50, 0)
    assert "is_std_low" not in result  # the spread over splits has no interval of its own
    # the values themselves are those without intervals
    plain = quality_metrics(_images(0, 60, shift=6), _images(1, 80), BlockExtractor(), is_split_size=20)
    assert {k: result[k] for k in plain} == plain


def test_no_resamples_no_intervals():
    result = _quality(resamples=0)(_images(0, 60))
    assert not [k for k in result if k.endswith(("_low", "_high")) or k.startswith("quality_")]


def test_paired_scores_each_set_as_alone_and_adds_the_differences():
    ex = BlockExtractor()
    quality = _quality(ex, resamples=40)
    ours, base = _images(0, 60, shift=30), _images(0, 60, shift=24)  # the same noise shifted: strongly paired
    got, got_base = quality.paired(ours, base)
    assert sorted(ex.calls) == [60, 60, 80]  # each set extracted once, the reference once
    alone, alone_base = _quality(resamples=40)(ours), _quality(resamples=40)(base)
    assert got_base == alone_base and {k: got[k] for k in alone} == alone
    for key in ("fid", "sfid", "is_mean", "precision", "recall"):
        assert got[f"{key}_delta"] == pytest.approx(alone[key] - alone_base[key], abs=1e-12), key
        assert got[f"{key}_delta_low"] <= got[f"{key}_delta"] <= got[f"{key}_delta_high"], key
        assert f"{key}_delta" not in got_base
    keys = list(got)
    assert keys[keys.index("fid"):keys.index("fid") + 6] == [
        "fid", "fid_low", "fid_high", "fid_delta", "fid_delta_low", "fid_delta_high"]
    # paired: far tighter than the two intervals side by side
    unpaired = np.hypot(got["fid_high"] - got["fid"], got_base["fid_high"] - got_base["fid"])
    assert got["fid_delta_high"] - got["fid_delta"] < 0.5 * unpaired


def test_paired_needs_sets_of_equal_size():
    with pytest.raises(ValueError, match="as many images as baseline images, got 60 and 40"):
        _quality(resamples=0).paired(_images(0, 60), _images(0, 40))


def test_bad_resamples_fail_at_construction():
    with pytest.raises(ValueError, match="quality.resamples must be 0 .* got 3"):
        _quality(resamples=3)
