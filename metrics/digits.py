"""A small CNN digit classifier and the feature extractor built on it.

This is the embedded counterpart of the Inception network used for CIFAR-10 /
ImageNet metrics: the harness's default model is a DDPM trained on the
scikit-learn digits upscaled to 16x16 (see ``bench/digits.py``), and FID / IS /
precision / recall for it are computed on the features of this classifier.

Architecture (``DigitClassifier``), for a 1 x 16 x 16 input::

    conv3x3(1 -> c0) ReLU  conv3x3(c0 -> c0) ReLU  maxpool2   # 8 x 8
    conv3x3(c0 -> c1) ReLU  maxpool2                          # 4 x 4
    flatten  linear(c1*16 -> feature_dim) ReLU                # "pool" features
    dropout  linear(feature_dim -> 10)                        # "logits"

Input scaling: uint8 pixel ``u`` -> ``(u / 255 - input_mean) / input_std``.

Weights live in a directory with ``config.json`` (the constructor arguments
plus ``architecture``) and ``model.safetensors``.  This module does not import
anything from ``bench``; callers pass the directory (the harness ships one at
``bench/assets/digits/classifier``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metrics.features import FeatureExtractor, check_images, iter_batches
from metrics.hashing import new_hasher, update_with_array

__all__ = ["DigitClassifier", "DigitFeatureExtractor", "ARCHITECTURE"]

ARCHITECTURE = "DigitClassifier"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DigitClassifier(nn.Module):
    """Three-conv CNN for 16x16 greyscale digits with a ``feature_dim`` penultimate layer."""

    def __init__(
        self,
        channels: tuple[int, int] = (32, 64),
        feature_dim: int = 128,
        num_classes: int = 10,
        image_size: int = 16,
        dropout: float = 0.3,
        input_mean: float = 0.5,
        input_std: float = 0.5,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError("image_size must be divisible by 4")
        c0, c1 = (int(c) for c in channels)
        self.config = {
            "architecture": ARCHITECTURE,
            "channels": [c0, c1],
            "feature_dim": int(feature_dim),
            "num_classes": int(num_classes),
            "image_size": int(image_size),
            "dropout": float(dropout),
            "input_mean": float(input_mean),
            "input_std": float(input_std),
        }
        self.conv1 = nn.Conv2d(1, c0, 3, padding=1)
        self.conv2 = nn.Conv2d(c0, c0, 3, padding=1)
        self.conv3 = nn.Conv2d(c0, c1, 3, padding=1)
        self.fc = nn.Linear(c1 * (image_size // 4) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (or 0..255 float) N x 1 x H x W -> network input."""
        x = images_uint8.to(torch.float32) / 255.0
        return (x - self.config["input_mean"]) / self.config["input_std"]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input -> (penultimate features, logits)."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(x, 2)
        feat = F.relu(self.fc(x.flatten(1)))
        return feat, self.head(self.drop(feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]

    # ------------------------------------------------------------------ io
    def save_pretrained(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "DigitClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_file.is_file() or not w_file.is_file():
            raise FileNotFoundError(f"{path} must hold {CONFIG_NAME} and {WEIGHTS_NAME}")
        cfg = json.loads(cfg_file.read_text())
        arch = cfg.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ValueError(f"{cfg_file}: architecture {arch!r} is not {ARCHITECTURE!r}")
        model = cls(**cfg)
        model.load_state_dict(load_file(str(w_file)), strict=True)
        return model.eval()


class DigitFeatureExtractor(FeatureExtractor):
    """Features of :class:`DigitClassifier` for digit metrics.

    ``extract(images)`` takes uint8 ``N x H x W x C`` images (C = 1, or 3 which
    is averaged to 1; sizes other than the classifier's 16x16 are resized with
    antialiased bilinear interpolation) and returns float64 arrays:
    ``"pool"`` (N x feature_dim, penultimate ReLU features, for FID and
    precision/recall) and ``"logits"`` (N x 10, for the Inception Score).
    There is no ``"spatial"`` key.  ``cache_id`` is ``name@<weights digest>``.
    """

    name = "digits-cnn"

    def __init__(self, model: DigitClassifier, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._digest: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "DigitFeatureExtractor":
        """Load from a directory holding ``config.json`` + ``model.safetensors``."""
        return cls(DigitClassifier.from_pretrained(path), device=device)

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    @property
    def cache_id(self) -> str:
        """``name`` plus a digest of the config and weights, so other weights never share a cache entry."""
        if self._digest is None:
            h = new_hasher()
            h.update(json.dumps(self.model.config, sort_keys=True).encode())
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                update_with_array(h, v.detach().cpu().numpy())
            self._digest = h.hexdigest()[:16]
        return f"{self.name}@{self._digest}"

    @torch.no_grad()
    def extract(self, images, batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
        images = check_images(images)
        size = self.model.image_size
        pools, logits = [], []
        for sl in iter_batches(images.shape[0], batch_size, progress, desc=f"{self.name} features"):
            x = torch.from_numpy(np.ascontiguousarray(images[sl])).permute(0, 3, 1, 2).to(torch.float32)
            if x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            feat, lg = self.model.forward_features(self.model.normalize(x).to(self.device))
            pools.append(feat.double().cpu().numpy())
            logits.append(lg.double().cpu().numpy())
        return {"pool": np.concatenate(pools), "logits": np.concatenate(logits)}
