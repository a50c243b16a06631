"""Inception-v3 features in the ADM evaluator's conventions, on torch-fidelity's port.

``InceptionV3Extractor`` wraps ``torch_fidelity.feature_extractor_inceptionv3.
FeatureExtractorInceptionV3`` (the PyTorch port of the TF "2015-12-05"
Inception graph ``classify_image_graph_def.pb`` that the FID/IS/ADM evaluators
use; torch-fidelity registers it as ``inception-v3-compat``) and returns, from
ONE forward pass:

``"pool"``     pool3, 2048-d (ADM ``pool_3:0``) -> FID, precision/recall;
``"logits"``   1008-way logits WITHOUT the fc bias (torch-fidelity
               ``logits_unbiased``) -> Inception Score;
``"spatial"``  ADM ``mixed_6/conv:0``, first 7 channels, 17 x 17 x 7 = 2023
               values flattened in NHWC order -> sFID.

Why ``logits_unbiased``: the ADM evaluator (``_create_softmax_graph``) takes
the weight matrix of the graph's ``softmax/logits/MatMul`` op and computes
``softmax(pool3 @ W)``, never adding ``softmax/biases``; torch-fidelity's
``logits_unbiased`` is exactly ``pool3 @ fc.weight.T``.  (Same convention as
the original improved-GAN Inception Score code, which ADM inherited.)

Which tensor sFID reads, and how that was checked:

* Block: the TF graph names its Inception blocks ``mixed, mixed_1, ...,
  mixed_10``; torch-fidelity's weight-conversion table
  (``utils/util_convert_inception_weights.py``) maps ``mixed_6/conv/*`` to
  ``Mixed_6d.branch1x1.*``.  So ``mixed_6`` is ``Mixed_6d`` (not ``Mixed_6e``,
  which is ``mixed_7``), and ``mixed_6/conv`` is its 1x1 branch.
* Before or after batch-norm/ReLU: in the TF graph a conv layer ``X`` is the op
  sequence ``X/conv2d_params, X/Conv2D, X/batchnorm, X/CheckNumerics,
  X/control_dependency, X`` (op listing of ``classify_image_graph_def.pb``);
  the graph has no separately named ReLU ops, so the op named ``X`` itself, the
  last one, after the batch-norm, is the layer's ReLU output.  Tensor
  ``mixed_6/conv:0`` is therefore ReLU(BN(Conv(x))).  torch-fidelity's
  ``BasicConv2d.forward`` is conv -> bn(eps=1e-3) -> relu, so the matching
  tensor is the *output of the module* ``Mixed_6d.branch1x1`` (a forward hook
  on it), not the output of its ``.conv`` (which would be ``mixed_6/conv/Conv2D``).
  ``tests/test_metrics_inception.py`` checks that the hooked values equal
  relu(bn(conv(.))) of that branch and are non-negative.
* Channel slice and order: ADM takes ``spatial[..., :7]`` of the NHWC TF tensor
  and reshapes to ``[N, -1]``, i.e. the flattening index is
  ``(h * 17 + w) * 7 + c``; the port is NCHW, so we slice channels, permute to
  NHWC, then flatten.

Preprocessing: torch-fidelity takes uint8 N x 3 x H x W, resizes to 299 x 299
with a TF1-compatible bilinear resize and maps ``(x - 128) / 128``, which is
what the TF graph does to the images ADM feeds into ``ExpandDims:0``.  Grey
images (C = 1) are repeated to 3 channels.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from metrics.features import (
    local_weights,
    INCEPTION_NAME,
    FeatureExtractor,
    check_images,
    iter_batches,
    no_tf32,
)
from metrics.hashing import file_digest

__all__ = [
    "INCEPTION_NAME",
    "INCEPTION_WEIGHTS_URL",
    "WEIGHTS_CONFIG_KEY",
    "SPATIAL_MODULE",
    "SPATIAL_CHANNELS",
    "InceptionV3Extractor",
    "resolve_inception_weights",
    "save_random_inception_weights",
]

WEIGHTS_CONFIG_KEY = "metrics.inception_weights"
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # ADM's mixed_6/conv (see module docstring)
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023


INCEPTION_WEIGHTS_URL = URL_INCEPTION_V3  # where torch-fidelity downloads the converted TF weights from


def resolve_inception_weights(path: str | os.PathLike | None = None, progress: bool = False) -> str:
    """Local path of the Inception weights: ``path`` if given, else torch hub's cache (downloading if allowed).

    Raises a one-line :class:`MissingWeightsError` naming the file, its download
    URL and the config key ``metrics.inception_weights`` when the weights are
    not on disk and cannot be downloaded (``HF_HUB_OFFLINE`` set, no network).
    """
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_WEIGHTS_URL)
    # no hash check, as torch-fidelity
    return local_weights("Inception weights", INCEPTION_WEIGHTS_URL, cached, WEIGHTS_CONFIG_KEY, path,
                         progress=progress)


class _ArchitectureOnly(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception whose constructor skips loading weights (to make random ones)."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def _architecture_only() -> FeatureExtractorInceptionV3:
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)  # the constructor torch.load()s this, then calls the no-op load_state_dict
        return _ArchitectureOnly(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=empty)


def save_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a random state_dict for torch-fidelity's Inception (tests and CPU benchmarks only).

    Convolutions are Kaiming-normal (fan-in, ReLU gain), batch-norms are the
    identity (gamma 1, beta 0, running mean 0, variance 1), the fc layer is
    N(0, 0.01) with a N(0, 0.01) bias (non-zero, so biased and unbiased logits
    differ).  No network access: the architecture comes from torch-fidelity.
    """
    gen = torch.Generator().manual_seed(seed)
    model = _architecture_only()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.01, generator=gen)
                torch.nn.init.normal_(module.bias, std=0.01, generator=gen)
    torch.save(model.state_dict(), str(path))
    return str(path)


@contextlib.contextmanager
def _capture_output(module: torch.nn.Module):
    """Forward hook on ``module`` for the block; yields a list receiving its outputs; removes the hook."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _inp, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


class InceptionV3Extractor(FeatureExtractor):
    """pool3 / unbiased logits / ADM spatial features of torch-fidelity's ``inception-v3-compat`` (one pass)."""

    name = INCEPTION_NAME

    def __init__(
        self,
        feature_extractor_weights_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        internal_dtype: str = "float32",
    ):
        self.weights_path = resolve_inception_weights(feature_extractor_weights_path)
        self.internal_dtype = internal_dtype
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = FeatureExtractorInceptionV3(
            INCEPTION_NAME,
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=self.weights_path,
            feature_extractor_internal_dtype=internal_dtype,
        ).to(self.device)
        self.spatial_module = self.model.get_submodule(SPATIAL_MODULE)
        self._digest: str | None = None

    @property
    def cache_id(self) -> str:
        """``name``, a digest of the weights file and the internal dtype: other weights never share a cache entry."""
        if self._digest is None:
            self._digest = file_digest(self.weights_path)[:16]
        return f"{self.name}@{self._digest}/{self.internal_dtype}"

    @torch.no_grad()
    def extract(self, images, batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
        images = check_images(images)
        pools, logits, spatials = [], [], []
        with no_tf32(), _capture_output(self.spatial_module) as captured:
            for sl in iter_batches(len(images), batch_size, progress, desc=f"{self.name} features"):
                x = torch.from_numpy(np.ascontiguousarray(images[sl])).permute(0, 3, 1, 2)
                x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
                pool, logit = self.model(x.contiguous().to(self.device))
                spatial = captured.pop()[:, :SPATIAL_CHANNELS]  # N x 7 x 17 x 17 (NCHW)
                spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)  # NHWC flatten, as ADM
                pools.append(pool.double().cpu().numpy())
                logits.append(logit.double().cpu().numpy())
                spatials.append(spatial.double().cpu().numpy())
        out = {"pool": np.concatenate(pools), "logits": np.concatenate(logits), "spatial": np.concatenate(spatials)}
        if out["spatial"].shape[1] != SPATIAL_DIM:
            raise RuntimeError(f"{SPATIAL_MODULE} gave {out['spatial'].shape[1]} values per image, not {SPATIAL_DIM}")
        return out
