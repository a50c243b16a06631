"""The embedded default model: sklearn-digits data helpers, shipped DDPM and classifier."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench
import metrics.digits as md
from metrics.features import FeatureExtractor
from bench.models.digits import (
    load_digits_images,
    load_digits_labels,
    split_indices,
    to_model_space,
    to_uint8,
)

ASSETS = Path(bench.__file__).resolve().parent / "assets" / "digits"
CLASSIFIER = ASSETS / "classifier"


# ---------------------------------------------------------------------- data
def test_split_sizes_dtypes_and_shapes():
    tr, te, al = (load_digits_images(s) for s in ("train", "test", "all"))
    assert tr.shape == (1497, 16, 16, 1)
    assert te.shape == (300, 16, 16, 1)
    assert al.shape == (1797, 16, 16, 1)
    for a in (tr, te, al):
        assert a.dtype == np.uint8
        assert a.min() == 0 and a.max() == 255
    ytr, yte = load_digits_labels("train"), load_digits_labels("test")
    assert ytr.shape == (1497,) and yte.shape == (300,)
    assert set(np.unique(yte)) == set(range(10))


def test_split_is_a_deterministic_partition():
    itr, ite = split_indices("train"), split_indices("test")
    assert len(np.intersect1d(itr, ite)) == 0
    assert np.array_equal(np.sort(np.concatenate([itr, ite])), np.arange(1797))
    assert np.array_equal(load_digits_images("test"), load_digits_images("test"))
    assert np.array_equal(load_digits_images("all")[ite], load_digits_images("test"))
    assert np.array_equal(load_digits_labels("all")[itr], load_digits_labels("train"))
    # the split is fixed forever (numpy.random.default_rng(0).permutation(1797)[:300])
    assert ite[:5].tolist() == np.sort(np.random.default_rng(0).permutation(1797)[:300])[:5].tolist()
    with pytest.raises(ValueError):
        load_digits_images("val")


def test_upscaling_matches_bilinear_interpolation():
    from sklearn.datasets import load_digits

    raw = load_digits().images[:3] / 16.0
    x = torch.nn.functional.interpolate(
        torch.tensor(raw, dtype=torch.float32)[:, None], size=(16, 16), mode="bilinear", align_corners=False
    )
    expect = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(load_digits_images("all")[:3], expect)


def test_model_space_round_trip():
    imgs = load_digits_images("test")[:32]
    x = to_model_space(imgs)
    assert x.dtype == torch.float32 and x.shape == (32, 1, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0
    back = to_uint8(x)
    assert back.dtype == np.uint8 and back.shape == imgs.shape
    assert np.array_equal(back, imgs)
    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert np.array_equal(to_uint8(to_model_space(every)), every)
    # to_uint8 clamps
    out = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5))
    assert out.reshape(-1).tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError):
        to_model_space(imgs.astype(np.float32))


# ---------------------------------------------------------------------- shipped DDPM
def _skip_count(unet) -> int:
    n = 1  # conv_in
    for blk in unet.down_blocks:
        n += len(blk.resnets) + (len(blk.downsamplers) if blk.downsamplers is not None else 0)
    return n


def test_shipped_unet_loads_with_cifar10_layout():
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(ASSETS), subfolder="unet").eval()
    cfg = unet.config
    assert list(cfg.down_block_types) == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert cfg.layers_per_block == 2
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size) == (1, 1, 16)
    assert len(unet.down_blocks) == 4 and len(unet.up_blocks) == 4
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2, 2]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]
    assert [hasattr(b, "attentions") for b in unet.down_blocks] == [False, True, False, False]
    assert [hasattr(b, "attentions") for b in unet.up_blocks] == [False, False, True, False]
    assert _skip_count(unet) == 12  # 12 DeepCache branches
    assert (ASSETS / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with torch.no_grad():
        out = unet(torch.zeros(2, 1, 16, 16), torch.tensor([10, 900])).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


def test_shipped_scheduler_and_training_record():
    from diffusers import DDIMScheduler, DDPMScheduler

    sch = DDPMScheduler.from_pretrained(str(ASSETS), subfolder="scheduler")
    c = sch.config
    assert c.num_train_timesteps == 1000 and c.beta_schedule == "linear"
    assert c.beta_start == pytest.approx(1e-4) and c.beta_end == pytest.approx(0.02)
    assert c.prediction_type == "epsilon"
    DDIMScheduler.from_pretrained(str(ASSETS), subfolder="scheduler")  # the sampler used by the harness
    rec = json.loads((ASSETS / "training.json").read_text())
    for key in ("seed", "steps", "wall_time_s", "threads", "torch_version", "diffusers_version",
                "final_losses", "classifier_test_accuracy"):
        assert key in rec
    assert rec["classifier_test_accuracy"] >= 0.95


def test_assets_are_small():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 8 * 2**20


# ---------------------------------------------------------------------- classifier / extractor
@pytest.fixture(scope="module")
def extractor():
    return md.DigitFeatureExtractor.from_pretrained(CLASSIFIER)


def test_shipped_classifier_held_out_accuracy(extractor):
    f = extractor.extract(load_digits_images("test"))
    acc = (f["logits"].argmax(1) == load_digits_labels("test")).mean()
    assert acc >= 0.95


def test_extractor_outputs(extractor):
    assert extractor.name == "digits-cnn"
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.cache_id.startswith("digits-cnn@")
    imgs = load_digits_images("test")[:37]
    f = extractor.extract(imgs, batch_size=8)
    assert set(f) == {"pool", "logits"}
    d = extractor.model.feature_dim
    assert 64 <= d <= 128
    assert f["pool"].shape == (37, d) and f["logits"].shape == (37, 10)
    assert f["pool"].dtype == np.float64 and f["logits"].dtype == np.float64
    assert (f["pool"] >= 0).all()
    g = extractor.extract(imgs, batch_size=64)
    np.testing.assert_allclose(f["pool"], g["pool"], rtol=1e-5, atol=1e-5)
    rgb = extractor.extract(np.repeat(imgs, 3, axis=-1))
    np.testing.assert_allclose(rgb["logits"], g["logits"], rtol=1e-5, atol=1e-5)
    big = extractor.extract(np.kron(imgs[:4], np.ones((1, 2, 2, 1), np.uint8)))  # 32x32 is resized
    assert big["pool"].shape == (4, d)


def test_extractor_rejects_bad_input(extractor):
    imgs = load_digits_images("test")[:4]
    with pytest.raises(ValueError):
        extractor.extract(imgs.astype(np.float32))
    with pytest.raises(ValueError):
        extractor.extract(imgs.astype(np.int64))
    with pytest.raises(ValueError):
        extractor.extract(imgs[..., 0])  # N x H x W
    with pytest.raises(ValueError):
        extractor.extract(np.repeat(imgs, 2, axis=-1))  # C = 2
    with pytest.raises(ValueError):
        extractor.extract(torch.from_numpy(imgs))  # not numpy


def test_metrics_digits_does_not_import_bench():
    tree = ast.parse(Path(md.__file__).read_text())
    mods = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.append(node.module)
    assert not [m for m in mods if m == "bench" or m.startswith("bench.")]
