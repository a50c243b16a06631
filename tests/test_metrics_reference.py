"""Reference statistics: loaders, precomputed statistics, content-keyed atomic disk cache."""

import os

import numpy as np
import pytest

from metrics import reference as refmod
from metrics.features import FeatureExtractor
from metrics.fid import statistics
from metrics.reference import (
    cache_key,
    from_adm_npz,
    from_array,
    from_folder,
    from_hf_dataset,
    from_stats_npz,
    load_reference,
)


class CountingExtractor(FeatureExtractor):
    """Block means of the grey image ("pool"), its first pixels ("spatial"); records each call's size."""

    def __init__(self, name="toy-blocks"):
        self.name = name
        self.calls = []

    def extract(self, images, batch_size=64, progress=False):
        self.calls.append(len(images))
        grey = images.astype(np.float64).mean(axis=-1) / 255.0
        n, h, w = grey.shape
        pool = grey.reshape(n, 4, h // 4, 4, w // 4).mean(axis=(2, 4)).reshape(n, 16)
        return {"pool": pool, "logits": pool[:, :5] * 4.0, "spatial": grey.reshape(n, -1)[:, :6]}


def _images(seed=0, n=40):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def test_reload_hits_the_cache_and_returns_the_same_numbers(tmp_path):
    images, ex = _images(), CountingExtractor()
    first = from_array(images).resolve(ex, layers=("pool", "spatial"), pr_count=25, cache_dir=tmp_path)
    again = from_array(images.copy()).resolve(ex, layers=("pool", "spatial"), pr_count=25, cache_dir=tmp_path)
    assert ex.calls == [40]  # one pass for everything, none on reload
    for layer in ("pool", "spatial"):
        for a, b in zip(first.stats[layer], again.stats[layer]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.pr_features, again.pr_features)
    np.testing.assert_allclose(first.stats["pool"][0], statistics(ex.extract(images)["pool"])[0])
    assert first.pr_features.shape == (25, 16) and first.pr_features.dtype == np.float64
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_content_change_misses_the_cache(tmp_path):
    images, ex = _images(), CountingExtractor()
    from_array(images).resolve(ex, cache_dir=tmp_path)
    changed = images.copy()
    changed[3, 2, 1, 0] ^= 1
    assert from_array(changed).content_hash() != from_array(images).content_hash()
    from_array(changed).resolve(ex, cache_dir=tmp_path)
    assert ex.calls == [40, 40]


def test_key_depends_on_every_component(monkeypatch):
    base = cache_key("content", "extractor@abc", "pool", "stats")
    others = [
        cache_key("content2", "extractor@abc", "pool", "stats"),
        cache_key("content", "extractor@abd", "pool", "stats"),
        cache_key("content", "extractor@abc", "spatial", "stats"),
        cache_key("content", "extractor@abc", "pool", "features[:10000]"),
    ]
    monkeypatch.setattr(refmod, "PROTOCOL_VERSION", refmod.PROTOCOL_VERSION + 1)
    others.append(cache_key("content", "extractor@abc", "pool", "stats"))
    assert len({base, *others}) == 6


def test_other_extractor_name_misses_the_cache(tmp_path):
    images = _images()
    a, b = CountingExtractor("toy-a"), CountingExtractor("toy-b")
    from_array(images).resolve(a, cache_dir=tmp_path)
    from_array(images).resolve(b, cache_dir=tmp_path)
    assert a.calls == [40] and b.calls == [40]


def test_failed_write_leaves_no_entry_and_no_temp_file(tmp_path, monkeypatch):
    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(refmod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        from_array(_images()).resolve(CountingExtractor(), cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_entry_under_a_wrong_key_is_ignored(tmp_path):
    images, ex = _images(), CountingExtractor()
    ref = from_array(images)
    ref.resolve(ex, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    other = from_array(_images(seed=1))
    entry.rename(tmp_path / f"{cache_key(other.content_hash(), ex.cache_id, 'pool', 'stats')}.npz")
    other.resolve(ex, cache_dir=tmp_path)
    assert ex.calls == [40, 40]


def _write_adm(path, images, **drop):
    rng = np.random.default_rng(5)
    arrays = {
        "arr_0": images,
        "mu": rng.normal(size=16),
        "sigma": np.eye(16),
        "mu_s": rng.normal(size=6),
        "sigma_s": np.eye(6) * 2,
    }
    np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})
    return arrays


def test_adm_batch_statistics_used_for_the_same_extractor_name(tmp_path):
    arrays = _write_adm(tmp_path / "ref.npz", _images(n=30))
    ex = CountingExtractor("inception-v3-compat")
    resolved = from_adm_npz(tmp_path / "ref.npz").resolve(ex, layers=("pool", "spatial"), pr_count=20)
    np.testing.assert_array_equal(resolved.stats["pool"][0], arrays["mu"])
    np.testing.assert_array_equal(resolved.stats["spatial"][1], arrays["sigma_s"])
    assert ex.calls == [20]  # only the precision/recall features of the first 20 images


def test_adm_batch_statistics_recomputed_for_another_extractor(tmp_path):
    images = _images(n=30)
    _write_adm(tmp_path / "ref.npz", images)
    ex = CountingExtractor("digits-cnn")
    resolved = from_adm_npz(tmp_path / "ref.npz").resolve(ex, layers=("pool",))
    np.testing.assert_allclose(resolved.stats["pool"][0], statistics(ex.extract(images)["pool"])[0])


@pytest.mark.parametrize("drop", ["arr_0", "mu", "sigma_s"])
def test_adm_npz_missing_key_is_named(tmp_path, drop):
    _write_adm(tmp_path / "ref.npz", _images(n=4), **{drop: True})
    with pytest.raises(ValueError, match=f"missing key '{drop}'") as err:
        from_adm_npz(tmp_path / "ref.npz")
    assert "\n" not in str(err.value)


def test_stats_npz_missing_sigma_is_named(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="missing key 'sigma'"):
        load_reference(tmp_path / "stats.npz")


def test_stats_only_reference_cannot_give_precision_recall(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(16), sigma=np.eye(16))
    ref = from_stats_npz(tmp_path / "stats.npz")
    ex = CountingExtractor("inception-v3-compat")
    assert ref.resolve(ex, layers=("pool",)).stats["pool"][0].shape == (16,)
    with pytest.raises(ValueError, match="has no images to compute precision/recall"):
        ref.resolve(ex, layers=("pool",), pr_count=10)


def test_load_reference_dispatches_on_content(tmp_path):
    _write_adm(tmp_path / "adm.npz", _images(n=4))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    assert load_reference(tmp_path / "adm.npz").has_images
    assert not load_reference(tmp_path / "stats.npz").has_images
    with pytest.raises(ValueError, match="no such file"):
        load_reference(tmp_path / "nothing.txt")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        load_reference(tmp_path / "notes.txt")
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_reference(tmp_path / "corrupt.npz")


def test_folder_loader_and_its_content_hash(tmp_path):
    from PIL import Image

    images = _images(n=3)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    ref = from_folder(tmp_path)
    np.testing.assert_array_equal(ref.images(), images)
    assert from_folder(tmp_path, mode="L").images().shape == (3, 8, 8, 1)
    before = ref.content_hash()
    Image.fromarray(255 - images[1]).save(tmp_path / "01.png")
    assert from_folder(tmp_path).content_hash() != before
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "03.png")
    with pytest.raises(ValueError, match=r"03\.png is \(4, 4, 3\)"):
        from_folder(tmp_path).images()


def test_hf_dataset_loader(tmp_path):
    import datasets
    from PIL import Image

    images = _images(n=5)
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(i) for i in images], "label": list(range(5))})
    ds = ds.cast_column("img", datasets.Image())
    ref = from_hf_dataset(ds, column="img", limit=4)
    np.testing.assert_array_equal(ref.images(), images[:4])
    assert ref.content_hash() == from_hf_dataset(ds, column="img", limit=4).content_hash()
    with pytest.raises(ValueError, match="no column 'image'"):
        from_hf_dataset(ds)
