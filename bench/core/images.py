"""Between model space ([-1, 1] NCHW float) and images (uint8 NHWC, the ADM evaluator's layout)."""

from __future__ import annotations

import numpy as np
import torch


def to_model_space(images) -> torch.Tensor:
    """uint8 ``N x H x W x C`` images -> float32 ``N x C x H x W`` tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"expected N x H x W x C images, got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32)
    return x / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """Model-space ``N x C x H x W`` samples -> uint8 ``N x H x W x C`` images.

    Clamps to [-1, 1], maps with ``(x + 1) * 127.5``, rounds (half to even) and
    casts to uint8.
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 4:
        raise ValueError(f"expected N x C x H x W samples, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    x = torch.round((x + 1.0) * 127.5).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()
