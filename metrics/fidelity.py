"""Fidelity of each cached image to the uncached image of the same seed: PSNR, SSIM, LPIPS.

Caching papers after DeepCache (e.g. Pyramid Attention Broadcast, Zhao et al. 2024; TeaCache,
Liu et al. 2024) report, next to FID or VBench, how far an accelerated image is from the
image the uncached model makes from the same noise. :class:`Fidelity` takes two uint8
N x H x W x C batches (C = 1 or 3), image ``i`` of one paired with image ``i`` of the other,
computes each metric per pair and returns its mean with a 95 % interval.

Libraries, and why these:

* PSNR and SSIM: ``torchmetrics.functional.image`` (Lightning AI, released monthly; batched
  on any torch device, per-image results with ``reduction="none"``). piq 0.8 has both too,
  but its last release is from 2023, its PSNR adds 1e-8 to the MSE (an undocumented cap)
  and its SSIM downsamples large images by default; scikit-image's ``structural_similarity``
  is NumPy, one image at a time, and a 14 MB wheel with four more dependencies.
* LPIPS: the ``lpips`` package (Zhang et al., CVPR 2018; richzhang/PerceptualSimilarity),
  the reference implementation. Its wheel ships the linear calibration weights fitted to
  human judgments (``weights/v0.1/<net>.pth``; torchmetrics vendors byte-identical copies)
  and it needs nothing the harness does not already have (torch, torchvision, numpy, scipy,
  tqdm). torchmetrics' LPIPS loads its backbone only through a download (a private class
  would be needed to give it a local file). The backbone (torchvision's ImageNet AlexNet or
  VGG-16) is never downloaded by ``lpips`` here: it is built random and the weights file is
  loaded into it (:func:`resolve_lpips_backbone`, setting ``metrics.lpips_backbone_weights``).

Conventions (each one ours where the papers leave it open; docs/metrics.md "Fidelity to the
uncached image"):

* PSNR per image, ``10 log10(255^2 / MSE)`` over all pixels and channels of the pair, then
  averaged over images (not the PSNR of the pooled MSE). An identical pair has MSE 0 and an
  infinite PSNR, which JSON cannot hold and which makes any mean infinite: it is capped at
  :func:`psnr_cap`, ``10 log10(255^2 H W C)``, the PSNR of the smallest error an 8-bit image
  of that size can have (one channel of one pixel off by one level), so an identical pair
  ranks with the closest non-identical ones and the mean stays finite; ``psnr_identical``
  counts the identical pairs.
* SSIM (Wang et al., IEEE TIP 2004): the 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01,
  K2 = 0.03, dynamic range 255, population (weighted) variances, the map averaged over the
  window positions that lie inside the image (the "valid" region of Wang's reference
  ``ssim_index.m``, as scikit-image's ``structural_similarity``) and over channels.
  torchmetrics 1.x averages its map over every pixel of a reflect-padded image instead, which
  moves SSIM by up to ~0.01 on 16 x 16 images: we take its map (``return_full_image``) and
  average the valid region ourselves. In float64: in float32 its ``E[x^2] - mu^2`` moves SSIM
  by up to ~1e-4 on smooth bright images.
  The same window for every image size, so numbers do not change meaning between models; on
  the digits model's 16 x 16 images that is 6 x 6 window positions, which still cover every
  pixel. Images smaller than the window are refused. No automatic downsampling of large
  images (Wang's script downsamples by round(min(H, W) / 256); torchmetrics and
  scikit-image do not).
* LPIPS v0.1, AlexNet by default (``lpips``' own default, its authors' choice "as a forward
  metric"), on images scaled to [-1, 1] (``u / 127.5 - 1``), as ``lpips.LPIPS`` expects.
  Grey images (C = 1) are repeated to 3 channels. Images whose shorter side is below
  :data:`LPIPS_MIN_SIDE` = 64 are upsampled bilinearly (``align_corners=False``) so that the
  shorter side is 64: AlexNet cannot run on 16 x 16 images at all (its second max-pool gets
  a 1 x 1 map; it needs at least 31 px), and LPIPS' calibration was fitted on 64 x 64
  patches (BAPPS). Larger images are scored at their own size, as ``lpips`` does.
* Interval: the Student-t 95 % interval of the mean, ``mean +- t(0.975, n-1) s / sqrt(n)``.
  The pairs are independent across sample indices (each index has its own seed), so the
  mean of their values is what the central limit theorem covers; t instead of the normal
  quantile keeps the coverage honest at small n (the 8-image tests), and unlike a bootstrap
  it needs no resampling seed and gives the same numbers on every machine. It is the
  interval of the mean over seeds, not of a measurement error.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metrics.errors import one_line
from metrics.features import MissingWeightsError, local_weights, check_images, iter_batches, no_tf32
from metrics.hashing import file_digest

__all__ = [
    "FIDELITY_METRICS",
    "DEFAULT_METRICS",
    "LPIPS_NETS",
    "LPIPS_MIN_SIDE",
    "LPIPS_WEIGHTS_CONFIG_KEY",
    "SSIM_KERNEL",
    "SSIM_SIGMA",
    "Fidelity",
    "LpipsDistance",
    "backbone_url",
    "lpips_input",
    "mean_interval",
    "psnr_cap",
    "psnr_per_image",
    "resolve_lpips_backbone",
    "save_random_backbone_weights",
    "ssim_per_image",
]

FIDELITY_METRICS = ("psnr", "ssim", "lpips")
#: What ``which=None`` computes: these, plus LPIPS when its backbone weights are on disk.
DEFAULT_METRICS = ("psnr", "ssim")
FIDELITY_CONFIG_KEY = "metrics.fidelity"
LPIPS_WEIGHTS_CONFIG_KEY = "metrics.lpips_backbone_weights"
LPIPS_NET_CONFIG_KEY = "metrics.lpips_net"
#: lpips' name of a backbone -> (torchvision builder, torchvision weights enum)
LPIPS_NETS = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights")}
LPIPS_VERSION = "0.1"
LPIPS_MIN_SIDE = 64
SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
DATA_RANGE = 255.0
CONFIDENCE = 0.95
PROTOCOL_VERSION = 1


# ------------------------------------------------------------------------------------ helpers


def _pair(cached, baseline) -> tuple[np.ndarray, np.ndarray]:
    cached, baseline = check_images(cached), check_images(baseline)
    if cached.shape != baseline.shape:
        raise ValueError(f"cached images {cached.shape} and baseline images {baseline.shape} differ in shape")
    return cached, baseline


def _tensor(images: np.ndarray, device, dtype):
    """uint8 N x H x W x C -> N x C x H x W tensor of 0..255 values."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device=device, dtype=dtype)


def _device(device):
    import torch

    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def mean_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the Student-t interval of the mean of ``values`` (see the module
    docstring); low and high are None for a single value."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("no values to average")
    if not np.isfinite(v).all():
        raise ValueError(f"{int((~np.isfinite(v)).sum())} of {v.size} values are not finite")
    mean = float(v.mean())
    if v.size < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


# --------------------------------------------------------------------------------- PSNR, SSIM


def psnr_cap(shape: Sequence[int]) -> float:
    """The PSNR given to an identical pair of uint8 images of ``shape`` (N x H x W x C or
    H x W x C): ``10 log10(255^2 H W C)``, that of one channel of one pixel off by one."""
    h, w, c = shape[-3:]
    return float(10 * np.log10(DATA_RANGE**2 * h * w * c))


def psnr_per_image(cached, baseline, *, device=None, batch_size: int = 64) -> np.ndarray:
    """PSNR (dB) of each pair, identical pairs at :func:`psnr_cap` (float64, N)."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    cached, baseline = _pair(cached, baseline)
    dev = _device(device)
    out = []
    for sl in iter_batches(len(cached), batch_size):
        a, b = _tensor(cached[sl], dev, torch.float64), _tensor(baseline[sl], dev, torch.float64)
        out.append(peak_signal_noise_ratio(a, b, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3)).cpu())
    psnr = torch.cat(out).numpy().astype(np.float64)
    return np.where(np.isposinf(psnr), psnr_cap(cached.shape), psnr)


def ssim_per_image(cached, baseline, *, device=None, batch_size: int = 64) -> np.ndarray:
    """SSIM of each pair (float64, N): Gaussian 11 x 11 window, sigma 1.5, valid region,
    averaged over channels (module docstring)."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    cached, baseline = _pair(cached, baseline)
    h, w = cached.shape[1:3]
    if min(h, w) < SSIM_KERNEL:
        raise ValueError(f"SSIM needs images of at least {SSIM_KERNEL} x {SSIM_KERNEL} px (its window), got {h} x {w}")
    dev = _device(device)
    out = []
    for sl in iter_batches(len(cached), batch_size):
        a, b = _tensor(cached[sl], dev, torch.float64), _tensor(baseline[sl], dev, torch.float64)
        _, full = structural_similarity_index_measure(
            a, b, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL, reduction="none",
            data_range=DATA_RANGE, k1=SSIM_K[0], k2=SSIM_K[1], return_full_image=True,
        )
        pad = (SSIM_KERNEL - 1) // 2  # the map is H x W over a reflect-padded image: keep the valid region
        out.append(full[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3)).cpu())
    return torch.cat(out).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------- LPIPS


def _net(net: str) -> tuple[str, str]:
    if net not in LPIPS_NETS:
        raise ValueError(f"{LPIPS_NET_CONFIG_KEY}={net!r} is not an LPIPS backbone: {', '.join(LPIPS_NETS)}")
    return LPIPS_NETS[net]


def backbone_url(net: str = "alex") -> str:
    """Where torchvision downloads the ImageNet weights of LPIPS' backbone ``net``."""
    import torchvision

    arch, weights = _net(net)
    return getattr(torchvision.models, weights).IMAGENET1K_V1.url


def _hub_file(net: str) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(backbone_url(net))


def resolve_lpips_backbone(net: str = "alex", path: str | os.PathLike | None = None, *,
                           progress: bool = False) -> str:
    """Local file of the ImageNet weights of LPIPS' backbone: ``path`` if given, else
    torch hub's cache (where torchvision keeps them), downloading into it when downloads
    are on. A one-line :class:`MissingWeightsError` naming ``metrics.lpips_backbone_weights``
    otherwise."""
    url = backbone_url(net)
    prefix = os.path.basename(url).rsplit("-", 1)[-1].split(".")[0]  # torchvision: <name>-<sha256 prefix>.pth
    return local_weights("LPIPS backbone weights", url, _hub_file(net), LPIPS_WEIGHTS_CONFIG_KEY, path,
                         progress=progress, hash_prefix=prefix)


def save_random_backbone_weights(path: str | os.PathLike, net: str = "alex", seed: int = 0) -> str:
    """Write a random state dict of torchvision's ``features`` of LPIPS' backbone (keys
    ``features.<i>.<weight|bias>``, as in torchvision's files, without the classifier that
    LPIPS does not use): for tests and benchmarks only."""
    import torch
    import torchvision

    arch, _ = _net(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = getattr(torchvision.models, arch)(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, str(path))
    return str(path)


def _load_backbone(lpips_model, net: str, path: str) -> None:
    """Load torchvision's ``features.<i>.*`` weights from ``path`` into ``lpips``' slices (each
    slice holds torchvision's ``features[i]`` under the name ``str(i)``)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"{LPIPS_WEIGHTS_CONFIG_KEY}={path}: not a torch state dict ({one_line(err, typed=True)})") \
            from None
    arch = _net(net)[0]
    features = {k: v for k, v in state.items() if k.startswith("features.")} if isinstance(state, dict) else {}
    used = set()
    trunk = lpips_model.net
    try:
        for i in range(1, trunk.N_slices + 1):
            for name, child in getattr(trunk, f"slice{i}").named_children():
                own = {p: features[f"features.{name}.{p}"] for p in child.state_dict()}
                child.load_state_dict(own)
                used.update(f"features.{name}.{p}" for p in own)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{LPIPS_WEIGHTS_CONFIG_KEY}={path} is not a torchvision {arch} state dict "
                         f"({type(err).__name__}: {one_line(err, first=True)})") from None
    if not used or set(features) - used:
        extra = sorted(set(features) - used)[:3]
        raise ValueError(f"{LPIPS_WEIGHTS_CONFIG_KEY}={path} is not a torchvision {arch} state dict "
                         f"({'no features.* weights' if not used else f'unexpected {extra}'})")


def lpips_input(images: np.ndarray, device=None):
    """uint8 N x H x W x C -> what ``lpips.LPIPS`` takes: float32 N x 3 x H' x W' in [-1, 1],
    grey repeated to RGB, upsampled (bilinear) so that the shorter side is at least
    :data:`LPIPS_MIN_SIDE`."""
    import torch
    import torch.nn.functional as F

    x = _tensor(check_images(images), _device(device), torch.float32) / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    h, w = x.shape[2:]
    if min(h, w) < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
    return x


class LpipsDistance:
    """LPIPS v0.1 (``lpips`` package: its calibration weights) on torchvision's ImageNet
    backbone ``net`` loaded from ``backbone_weights`` (:func:`resolve_lpips_backbone`)."""

    def __init__(self, net: str = "alex", backbone_weights: str | os.PathLike | None = None, device=None):
        import lpips

        self.net = net
        self.weights_path = resolve_lpips_backbone(net, backbone_weights)
        self.device = _device(device)
        with warnings.catch_warnings():  # lpips builds the trunk with torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, version=LPIPS_VERSION, pnet_rand=True, verbose=False)
        _load_backbone(model, net, self.weights_path)
        self.model = model.eval().to(self.device)
        self._digest: str | None = None

    @property
    def digest(self) -> str:
        """The first 8 hex digits of the backbone file's sha256 (torchvision's own files carry
        them in their names: ``alexnet-owt-7be5be79.pth``)."""
        if self._digest is None:
            self._digest = file_digest(self.weights_path)[:8]
        return self._digest

    def __call__(self, cached, baseline, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """LPIPS distance of each pair (float64, N)."""
        import torch

        cached, baseline = _pair(cached, baseline)
        out = []
        with torch.no_grad(), no_tf32():
            for sl in iter_batches(len(cached), batch_size, progress, desc="LPIPS"):
                a, b = lpips_input(cached[sl], self.device), lpips_input(baseline[sl], self.device)
                out.append(self.model(a, b).reshape(-1).double().cpu())
        return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------ together


class Fidelity:
    """PSNR / SSIM / LPIPS of cached images against the baseline images of the same indices.

    ``which``: any of :data:`FIDELITY_METRICS`; None: :data:`DEFAULT_METRICS`, plus
    ``lpips`` when its backbone weights are on disk (``lpips_backbone_weights``, or
    torchvision's file in torch hub's cache) -- otherwise ``lpips`` is recorded as None and
    :attr:`lpips_missing` says why. Asked for by name, LPIPS without weights is a
    :class:`MissingWeightsError` here, in the constructor, before anything is generated.
    """

    def __init__(self, which: Iterable[str] | None = None, *, lpips_net: str = "alex",
                 lpips_backbone_weights: str | os.PathLike | None = None, device=None, batch_size: int = 64,
                 progress: bool = False):
        auto = which is None
        wanted = list(DEFAULT_METRICS) + ["lpips"] if auto else list(dict.fromkeys(which))
        unknown = [m for m in wanted if m not in FIDELITY_METRICS]
        if unknown:
            raise ValueError(f"{FIDELITY_CONFIG_KEY}: unknown {unknown}; choose from {list(FIDELITY_METRICS)}")
        _net(lpips_net)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.which = tuple(m for m in FIDELITY_METRICS if m in wanted)
        self.device, self.batch_size, self.progress = device, batch_size, progress
        self.lpips: LpipsDistance | None = None
        self.lpips_missing: str | None = None
        if "lpips" in self.which:
            if auto and lpips_backbone_weights is None and not _hub_file(lpips_net).is_file():
                self.lpips_missing = one_line(MissingWeightsError(
                    f"LPIPS not computed: the {lpips_net} ImageNet weights {_hub_file(lpips_net).name} are not in "
                    f"{_hub_file(lpips_net).parent}; set {LPIPS_WEIGHTS_CONFIG_KEY} to a local copy (from "
                    f"{backbone_url(lpips_net)}), or {FIDELITY_CONFIG_KEY}=[psnr,ssim] to not ask for it"
                ))
            else:
                self.lpips = LpipsDistance(lpips_net, lpips_backbone_weights, device)
        self.lpips_net = lpips_net

    @property
    def protocol(self) -> str:
        """What produced the numbers, in one string (tables never mix protocols)."""
        parts = [f"fidelity-v{PROTOCOL_VERSION}"]
        if "psnr" in self.which:
            parts.append("psnr=per-image,identical-capped")
        if "ssim" in self.which:
            parts.append(f"ssim=gauss{SSIM_KERNEL}/{SSIM_SIGMA:g},valid")
        if "lpips" in self.which:
            parts.append("lpips=off" if self.lpips is None else
                         f"lpips={self.lpips_net}-v{LPIPS_VERSION}@{self.lpips.digest},min{LPIPS_MIN_SIDE}")
        parts.append(f"t{round(100 * CONFIDENCE)}")
        return " ".join(parts)

    def per_image(self, cached, baseline) -> dict[str, np.ndarray]:
        """Each requested metric for each pair (LPIPS only when it is available)."""
        cached, baseline = _pair(cached, baseline)
        kw = {"device": self.device, "batch_size": self.batch_size}
        out: dict[str, np.ndarray] = {}
        if "psnr" in self.which:
            out["psnr"] = psnr_per_image(cached, baseline, **kw)
            out["identical"] = np.all(cached == baseline, axis=(1, 2, 3))
        if "ssim" in self.which:
            out["ssim"] = ssim_per_image(cached, baseline, **kw)
        if self.lpips is not None:
            out["lpips"] = self.lpips(cached, baseline, batch_size=self.batch_size, progress=self.progress)
        return out

    def summary(self, values: dict[str, np.ndarray]) -> dict[str, Any]:
        """Per-image values -> the record's keys: ``<metric>``, ``<metric>_low``,
        ``<metric>_high`` (mean and 95 % interval), ``psnr_identical``, ``fidelity_protocol``."""
        row: dict[str, Any] = {}
        for m in self.which:
            if m not in values:  # lpips without weights
                row.update({m: None, f"{m}_low": None, f"{m}_high": None})
                continue
            mean, low, high = mean_interval(values[m])
            row.update({m: mean, f"{m}_low": low, f"{m}_high": high})
            if m == "psnr":
                row["psnr_identical"] = int(np.sum(values["identical"]))
        row["fidelity_protocol"] = self.protocol
        return row

    def score_chunks(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """:meth:`summary` over consecutive chunks of (cached, baseline) images, so that a large
        run never holds both image sets at once."""
        parts: dict[str, list[np.ndarray]] = {}
        n = 0
        for cached, baseline in pairs:
            n += len(cached)
            for k, v in self.per_image(cached, baseline).items():
                parts.setdefault(k, []).append(v)
        if n == 0:
            raise ValueError("no images to compare")
        return self.summary({k: np.concatenate(v) for k, v in parts.items()})

    def __call__(self, cached, baseline) -> dict[str, Any]:
        return self.score_chunks([(cached, baseline)])
