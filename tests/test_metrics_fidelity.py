"""PSNR / SSIM / LPIPS of cached images against the uncached ones (metrics/fidelity.py),
checked against closed forms and independent computations, never against themselves."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics.features import MissingWeightsError
from metrics.fidelity import (
    LPIPS_MIN_SIDE,
    Fidelity,
    LpipsDistance,
    lpips_input,
    mean_interval,
    psnr_cap,
    psnr_per_image,
    resolve_lpips_backbone,
    save_random_backbone_weights,
    ssim_per_image,
)

RNG = np.random.default_rng(0)


def _noisy(shape, spread=40, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-spread, spread + 1, shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.fixture(scope="module")
def alex_weights(tmp_path_factory):
    """Random torchvision AlexNet ``features`` weights (no ImageNet weights offline)."""
    return save_random_backbone_weights(tmp_path_factory.mktemp("lpips") / "alex_random.pth", "alex", seed=3)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with no backbone weights in it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


# ---------------------------------------------------------------------------------------- PSNR


@pytest.mark.parametrize("shape", [(5, 16, 16, 1), (3, 24, 32, 3)])
@pytest.mark.parametrize("d", [1, 5, 40])
def test_psnr_of_a_constant_offset_is_the_closed_form(shape, d):
    a = RNG.integers(0, 256 - d, shape, dtype=np.uint8)
    got = psnr_per_image(a + np.uint8(d), a, device="cpu")
    assert got == pytest.approx(np.full(shape[0], 10 * math.log10(255**2 / d**2)), rel=1e-7)


def test_psnr_is_per_image_then_averaged():
    a, b = _noisy((6, 16, 16, 3))
    b[0] = a[0] // 2  # one pair far worse than the others: the PSNR of pooled MSE would differ
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    per_image = 10 * np.log10(255**2 / mse)
    assert psnr_per_image(a, b, device="cpu") == pytest.approx(per_image, rel=1e-7)
    row = Fidelity(["psnr"], device="cpu")(a, b)
    assert row["psnr"] == pytest.approx(per_image.mean(), rel=1e-7)
    assert row["psnr"] != pytest.approx(10 * np.log10(255**2 / mse.mean()), rel=1e-3)


def test_identical_pairs_are_capped_at_the_one_level_bound_and_counted():
    a, b = _noisy((4, 16, 16, 1))
    b[1] = a[1]
    one_level = a[2].copy()
    one_level[3, 4, 0] = a[2][3, 4, 0] ^ 1  # one channel of one pixel off by one level
    b[2] = one_level
    cap = 10 * math.log10(255**2 * 16 * 16 * 1)
    assert psnr_cap(a.shape) == pytest.approx(cap)
    got = psnr_per_image(a, b, device="cpu")
    assert got[1] == pytest.approx(cap) and got[2] == pytest.approx(cap)  # identical ranks with the closest
    assert np.isfinite(got).all() and got[0] < cap and got[3] < cap
    row = Fidelity(["psnr"], device="cpu")(a, b)
    assert row["psnr_identical"] == 1 and row["psnr"] == pytest.approx(got.mean())


# ---------------------------------------------------------------------------------------- SSIM


def _gaussian_window(size=11, sigma=1.5):
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def _ssim_reference(a, b):
    """Wang et al. 2004 eq. (13) with the reference ssim_index.m conventions: 11 x 11 Gaussian
    window (sigma 1.5), K = (0.01, 0.03), L = 255, weighted population moments, the map's
    mean over the valid window positions; channels averaged. Direct window sums, in float64."""
    w = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        per_channel = []
        for c in range(x.shape[-1]):
            X = np.lib.stride_tricks.sliding_window_view(x[..., c], w.shape)
            Y = np.lib.stride_tricks.sliding_window_view(y[..., c], w.shape)
            mx, my = (X * w).sum((-2, -1)), (Y * w).sum((-2, -1))
            vx = (X * X * w).sum((-2, -1)) - mx**2
            vy = (Y * Y * w).sum((-2, -1)) - my**2
            cxy = (X * Y * w).sum((-2, -1)) - mx * my
            ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            per_channel.append(ssim_map.mean())
        out.append(np.mean(per_channel))
    return np.array(out)


@pytest.mark.parametrize("shape", [(4, 16, 16, 1), (3, 40, 37, 3), (2, 11, 11, 3)])
def test_ssim_matches_a_direct_computation_of_wangs_definition(shape):
    a, b = _noisy(shape, seed=1)
    assert ssim_per_image(a, b, device="cpu") == pytest.approx(_ssim_reference(a, b), abs=1e-12)


def test_ssim_averages_the_valid_region_not_a_padded_image():
    """torchmetrics' own mean (reflect-padded, every pixel) differs on 16 x 16 images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _noisy((4, 16, 16, 1), seed=2)
    padded = structural_similarity_index_measure(
        torch.from_numpy(a).permute(0, 3, 1, 2).double(), torch.from_numpy(b).permute(0, 3, 1, 2).double(),
        data_range=255.0, reduction="none").numpy()
    ours = ssim_per_image(a, b, device="cpu")
    assert np.abs(ours - padded).max() > 1e-3
    assert ours == pytest.approx(_ssim_reference(a, b), abs=1e-12)


def test_ssim_matches_scikit_image_where_installed():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _noisy((3, 32, 29, 3), seed=4)
    sk = [metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=255, channel_axis=-1) for x, y in zip(a, b)]
    assert ssim_per_image(a, b, device="cpu") == pytest.approx(sk, abs=1e-12)


def test_ssim_of_an_image_with_itself_is_one():
    a, _ = _noisy((3, 16, 16, 1))
    assert ssim_per_image(a, a, device="cpu") == pytest.approx(np.ones(3), abs=1e-12)


@pytest.mark.parametrize("x,y", [(0, 255), (30, 200), (128, 129), (77, 77)])
def test_ssim_of_two_constant_images_is_the_luminance_term(x, y):
    """No variance: the contrast-structure term is (0 + C2) / (0 + C2) = 1."""
    c1 = (0.01 * 255) ** 2
    a, b = np.full((1, 16, 16, 3), x, np.uint8), np.full((1, 16, 16, 3), y, np.uint8)
    expected = (2 * x * y + c1) / (x**2 + y**2 + c1)
    assert ssim_per_image(a, b, device="cpu")[0] == pytest.approx(expected, abs=1e-12)


def test_ssim_refuses_images_smaller_than_its_window():
    a = np.zeros((2, 10, 16, 1), np.uint8)
    with pytest.raises(ValueError, match="at least 11 x 11 px"):
        ssim_per_image(a, a, device="cpu")


# ------------------------------------------------------------------------------------ interval


def test_interval_is_the_student_t_interval_of_the_mean():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t(0.975, 3) * s / sqrt(n), s^2 = 5/3
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half), rel=1e-12)
    assert mean_interval([7.0]) == (7.0, None, None)
    with pytest.raises(ValueError, match="not finite"):
        mean_interval([1.0, math.inf])


# --------------------------------------------------------------------------------------- LPIPS


def _standard_lpips(weights_path, net="alex"):
    """``lpips.LPIPS`` built the package's own way, its trunk from torchvision's model with
    the weights loaded by torchvision's own key names (what ``tv.alexnet(pretrained=True)``
    would load from the ImageNet file)."""
    import lpips
    import torchvision
    from lpips import pretrained_networks

    arch = {"alex": "alexnet", "vgg": "vgg16"}[net]
    model = getattr(torchvision.models, arch)(weights=None)
    missing, unexpected = model.load_state_dict(torch.load(weights_path, weights_only=True), strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing)
    original = getattr(pretrained_networks.tv, arch)
    setattr(pretrained_networks.tv, arch, lambda *args, **kwargs: model)
    try:
        return lpips.LPIPS(net=net, version="0.1", verbose=False).eval()
    finally:
        setattr(pretrained_networks.tv, arch, original)


def _check_against_the_package(net, weights, shapes):
    ours = LpipsDistance(net, weights, device="cpu")
    ref = _standard_lpips(weights, net)
    for shape in shapes:
        a, b = _noisy(shape, seed=5)
        x0 = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
        x1 = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255
        if shape[-1] == 1:
            x0, x1 = x0.expand(-1, 3, -1, -1), x1.expand(-1, 3, -1, -1)
        side = min(shape[1:3])
        if side < 64:
            size = tuple(round(s * 64 / side) for s in shape[1:3])
            x0 = F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
            x1 = F.interpolate(x1, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            expected = ref(x0, x1, normalize=True).reshape(-1).double().numpy()
        assert ours(a, b) == pytest.approx(expected, rel=1e-5, abs=1e-7), shape


def test_lpips_equals_the_lpips_package_on_the_tensors_it_expects(alex_weights):
    """Our preprocessing (uint8 -> [-1, 1], grey -> RGB, small images upsampled to 64) and
    our loading of the backbone are what the package expects: its own [0, 1] -> [-1, 1] path
    (normalize=True), on tensors made here, with the trunk torchvision loaded, gives the
    same distances."""
    _check_against_the_package("alex", alex_weights, [(3, 64, 64, 3), (3, 16, 16, 1), (2, 48, 80, 3)])


@pytest.mark.integration
def test_lpips_vgg_equals_the_lpips_package(tmp_path):
    weights = save_random_backbone_weights(tmp_path / "vgg_random.pth", "vgg", seed=4)
    _check_against_the_package("vgg", weights, [(2, 16, 16, 1), (2, 40, 33, 3)])
    with pytest.raises(ValueError, match="is not a torchvision alexnet state dict"):
        LpipsDistance("alex", weights, device="cpu")  # VGG weights for AlexNet


def test_lpips_is_zero_for_identical_images_and_symmetric(alex_weights):
    d = LpipsDistance("alex", alex_weights, device="cpu")
    a, b = _noisy((4, 16, 16, 1), seed=6)
    assert np.all(d(a, a) == 0)
    ab, ba = d(a, b), d(b, a)
    assert np.all(ab > 0) and ab == pytest.approx(ba, rel=1e-6)


def test_lpips_of_grey_is_lpips_of_grey_repeated_to_rgb(alex_weights):
    d = LpipsDistance("alex", alex_weights, device="cpu")
    a, b = _noisy((3, 16, 16, 1), seed=7)
    assert d(a, b) == pytest.approx(d(np.repeat(a, 3, -1), np.repeat(b, 3, -1)), rel=1e-6)


def test_small_images_are_upsampled_because_alexnet_cannot_take_them(alex_weights):
    x = lpips_input(np.zeros((2, 16, 16, 1), np.uint8))
    assert tuple(x.shape) == (2, 3, LPIPS_MIN_SIDE, LPIPS_MIN_SIDE) and float(x.min()) == -1.0
    assert tuple(lpips_input(np.zeros((1, 16, 32, 3), np.uint8)).shape) == (1, 3, 64, 128)
    assert tuple(lpips_input(np.zeros((1, 96, 70, 3), np.uint8)).shape) == (1, 3, 96, 70)  # large: own size
    model = LpipsDistance("alex", alex_weights, device="cpu").model
    tiny = torch.zeros(1, 3, 16, 16)
    with pytest.raises(RuntimeError, match="too small"):
        model(tiny, tiny)


def test_lpips_backbone_file_is_checked(tmp_path, alex_weights):
    with pytest.raises(MissingWeightsError, match="metrics.lpips_backbone_weights must point"):
        LpipsDistance("alex", tmp_path / "nope.pth", device="cpu")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"metrics.lpips_backbone_weights=.*bad.pth is not a torchvision alexnet"):
        LpipsDistance("alex", tmp_path / "bad.pth", device="cpu")


def test_missing_backbone_offline_is_one_line_naming_the_setting(empty_hub):
    with pytest.raises(MissingWeightsError) as e:
        resolve_lpips_backbone("alex")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "alexnet-owt-7be5be79.pth" in msg
    assert "set metrics.lpips_backbone_weights" in msg
    with pytest.raises(MissingWeightsError, match="metrics.lpips_backbone_weights"):
        Fidelity(["psnr", "lpips"], device="cpu")  # asked for by name: refused


def test_backbone_is_downloaded_into_torch_hubs_cache_when_downloads_are_on(empty_hub, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert resolve_lpips_backbone("alex") == str(empty_hub / "alexnet-owt-7be5be79.pth")
    assert calls == [("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79")]

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(MissingWeightsError, match=r"could not be downloaded .*OSError: Network is unreachable.*"
                                                  r"set metrics.lpips_backbone_weights"):
        resolve_lpips_backbone("vgg")


def test_backbone_in_torch_hubs_cache_is_found(empty_hub, alex_weights):
    empty_hub.mkdir(parents=True)
    shutil.copy(alex_weights, empty_hub / "alexnet-owt-7be5be79.pth")
    assert resolve_lpips_backbone("alex") == str(empty_hub / "alexnet-owt-7be5be79.pth")
    f = Fidelity(device="cpu")  # the default takes LPIPS when its weights are there
    assert f.which == ("psnr", "ssim", "lpips") and f.lpips is not None and f.lpips_missing is None


# ------------------------------------------------------------------------------------ together


def test_default_without_lpips_weights_records_null_and_says_why(empty_hub):
    f = Fidelity(device="cpu")
    assert f.lpips is None and "metrics.lpips_backbone_weights" in f.lpips_missing
    assert "\n" not in f.lpips_missing
    a, b = _noisy((4, 16, 16, 1))
    row = f(a, b)
    assert row["lpips"] is None and row["lpips_low"] is None and row["lpips_high"] is None
    assert "lpips=off" in row["fidelity_protocol"]
    assert Fidelity(["psnr", "ssim"], device="cpu").lpips_missing is None  # not asked for: nothing to say


def test_fidelity_row_keys_and_chunks(alex_weights):
    f = Fidelity(["psnr", "ssim", "lpips"], lpips_backbone_weights=alex_weights, device="cpu", batch_size=3)
    a, b = _noisy((7, 16, 16, 1), seed=8)
    whole = f(a, b)
    chunked = f.score_chunks([(a[:4], b[:4]), (a[4:], b[4:])])
    assert whole == pytest.approx(chunked, rel=1e-6)  # LPIPS in float32: batches of other sizes
    for m in ("psnr", "ssim", "lpips"):
        assert whole[f"{m}_low"] < whole[m] < whole[f"{m}_high"]
    assert whole["psnr"] == pytest.approx(psnr_per_image(a, b, device="cpu").mean())
    assert "lpips=alex-v0.1@" in whole["fidelity_protocol"] and "ssim=gauss11/1.5,valid" in whole["fidelity_protocol"]
    with pytest.raises(ValueError, match="differ in shape"):
        f(a, b[:3])
    with pytest.raises(ValueError, match="unknown"):
        Fidelity(["psnr", "fid"])


# --------------------------------------------------------------------------------- in the runner

RUN = ["run.num_samples=8", "quality.is_split_size=4", "sampler.steps=10", "run.timing=off", "run.progress=false"]


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.integration
def test_digits_run_records_fidelity_of_the_cached_images(tmp_path, alex_weights, empty_hub, capsys):
    from bench.run.runner import run
    from bench.sampling.store import ImageStore
    from harness import compose_cfg

    cfg = compose_cfg(*RUN, f"run.store_dir={tmp_path}/store", "metrics.fidelity=[psnr,ssim,lpips]",
                      f"metrics.lpips_backbone_weights={alex_weights}")
    rec = _strict_json(run(cfg, tmp_path / "out"))
    m = rec["measurements"]
    for k in ("psnr", "ssim", "lpips"):
        assert all(math.isfinite(m[x]) for x in (k, f"{k}_low", f"{k}_high")), k
        assert m[f"{k}_low"] <= m[k] <= m[f"{k}_high"]
    assert 0 < m["ssim"] <= 1 and m["psnr_identical"] == 0 and m["lpips"] > 0
    assert not any(k.startswith(("psnr", "ssim", "lpips")) for k in rec["baseline"]["measurements"])

    # independently: the stored images, compared here
    indices = range(8)
    cached = ImageStore.existing(rec["store"]).load(indices)
    base = ImageStore.existing(rec["baseline"]["store"]).load(indices)
    assert cached.shape == (8, 16, 16, 1)
    assert m["psnr"] == pytest.approx(psnr_per_image(cached, base, device="cpu").mean(), rel=1e-9)
    assert m["ssim"] == pytest.approx(_ssim_reference(cached, base).mean(), abs=1e-12)

    # the baseline against itself: identical everywhere
    same = Fidelity(["psnr", "ssim", "lpips"], lpips_backbone_weights=alex_weights, device="cpu")(base, base)
    assert same["psnr"] == pytest.approx(psnr_cap(base.shape)) and same["psnr_identical"] == 8
    assert same["ssim"] == pytest.approx(1.0, abs=1e-12) and same["lpips"] == 0.0

    # the default without LPIPS weights: psnr and ssim, lpips null with one warning line
    capsys.readouterr()
    cfg = compose_cfg(*RUN, f"run.store_dir={tmp_path}/store")
    rec = _strict_json(run(cfg, tmp_path / "default"))
    assert rec["measurements"]["psnr"] == pytest.approx(m["psnr"]) and rec["measurements"]["lpips"] is None
    warning = [line for line in capsys.readouterr().err.splitlines() if "LPIPS" in line]
    assert len(warning) == 1 and "metrics.lpips_backbone_weights" in warning[0]

    # a run that is its own baseline (N = 1) has no fidelity row
    rec = _strict_json(run(compose_cfg(*RUN, f"run.store_dir={tmp_path}/store", "cache.interval=1"),
                           tmp_path / "n1"))
    assert "baseline" not in rec and "psnr" not in rec["measurements"]


def test_lpips_asked_for_without_weights_fails_before_generating(tmp_path, empty_hub):
    from bench.core.errors import HarnessError
    from bench.run.runner import run
    from harness import compose_cfg

    cfg = compose_cfg(*RUN, f"run.store_dir={tmp_path}/store", "metrics.fidelity=[psnr,lpips]")
    with pytest.raises(HarnessError, match=r"^metrics.fidelity: .*set metrics.lpips_backbone_weights") as e:
        run(cfg, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("**/samples_*.npz"))
    assert _strict_json(tmp_path / "out" / "run.json")["status"] == "failed"


def _messages(error: BaseException) -> str:
    out = []
    while error is not None:
        out.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(out)


@pytest.mark.parametrize("override,expect", [
    ("metrics.fidelity=[psnr,fid]", "Invalid value 'fid', expected one of [psnr, ssim, lpips]"),
    ("metrics.lpips_net=squeeze", "Invalid value 'squeeze', expected one of [alex, vgg]"),
])
def test_fidelity_setting_values_are_checked_at_composition(override, expect):
    from harness import compose_cfg

    with pytest.raises(Exception) as e:
        compose_cfg(override)
    assert expect in _messages(e.value)


def test_fidelity_can_be_turned_off():
    from bench.run.parts import resolve
    from bench.run.runner import fidelity_scorer
    from harness import compose_cfg

    cfg = compose_cfg("metrics.fidelity=[]")
    assert fidelity_scorer(cfg, resolve(cfg, "cpu")) is None
