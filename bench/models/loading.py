"""Model loading: the real ``from_pretrained`` path, or the shipped architecture with random weights.

Every model is described by a YAML file in ``conf/model/``; nothing here branches on
model names. ``weights=pretrained`` loads a diffusers directory (hub id or local
path, ``subfolder`` ``unet``) exactly as users load the paper's checkpoints;
``weights=random`` builds the same architecture from the config shipped in
``bench/archs/<name>/`` with a fixed seed, which is enough for MACs, timing and
every engine invariant.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn

from bench.core.errors import HarnessError
from bench.core.options import Conditioning, Output, Weights, value


@dataclass(frozen=True)
class ModelSpec:
    """One model as the layers below the runner see it (resolved from ``conf/model/*.yaml``
    by :func:`bench.run.parts.model_spec`): where its weights come from, its conditioning,
    and what surrounds its U-Net."""

    name: str
    unet_class: str  # e.g. diffusers.UNet2DModel
    arch: str  # shipped config directory (unet/ and scheduler/), for weights=random
    pretrained: str | None = None  # hub id or local diffusers directory; None: not given
    subfolder: str | None = "unet"
    scheduler_subfolder: str | None = "scheduler"
    weights: str = Weights.pretrained.value
    init_seed: int = 0  # seed for weights=random
    conditioning: str = Conditioning.none.value
    context_tokens: int = 0
    guidance_scale: float = 1.0
    output: str = Output.pixels.value
    pipeline: str | None = None  # class path of the conditioning + decoding around the U-Net


@dataclass
class LoadedModel:
    unet: nn.Module
    scheduler_config: dict[str, Any]
    source: str  # where the weights came from ("random:<seed>" or a path / hub id)

    @functools.cached_property
    def fingerprint(self) -> str:
        return weights_fingerprint(self.unet)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, size, size)


def weights_fingerprint(module: nn.Module) -> str:
    """A content fingerprint of a module's weights (a strided sample of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(spec: ModelSpec, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build the U-Net and read the scheduler config of ``spec``."""
    cls = get_class(spec.unet_class)
    if value(spec.weights) == Weights.random:
        unet_config = cls.load_config(spec.arch, subfolder="unet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            unet = cls.from_config(unet_config)
        scheduler_config = _scheduler_config(spec.arch, "scheduler", spec.name)
        source = f"random:{spec.init_seed}"
    else:
        if spec.pretrained is None:
            raise HarnessError(
                f"model {spec.name} has no default weights: set model.pretrained=<hub id or local diffusers "
                "directory> (or model.weights=random with run.mode=cost)"
            )
        unet = _from_pretrained(cls, spec.pretrained, spec.subfolder)
        scheduler_config = _scheduler_config(spec.pretrained, spec.scheduler_subfolder, spec.name)
        source = str(spec.pretrained)
    if next(unet.parameters()).dtype != dtype:
        unet.to(dtype=dtype)
    unet.to(device=device).eval().requires_grad_(False)
    return LoadedModel(unet, scheduler_config, source)


def _from_pretrained(cls: type, where: str, subfolder: str | None) -> nn.Module:
    if os.path.sep in where and not os.path.isdir(where):
        raise HarnessError(f"model.pretrained={where!r}: no such directory")
    try:
        return cls.from_pretrained(where, subfolder=subfolder)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarnessError(
            f"model.pretrained={where!r}: cannot load {cls.__name__} weights "
            f"(subfolder {subfolder!r}): {first}"
        ) from None


def _scheduler_config(where: str, subfolder: str | None, model: str) -> dict[str, Any]:
    from diffusers import (
        DDPMScheduler,  # any scheduler class reads scheduler_config.json
    )

    try:
        return dict(DDPMScheduler.load_config(where, subfolder=subfolder))
    except (OSError, ValueError) as e:
        raise HarnessError(
            f"model {model}: no scheduler config in {where!r} (subfolder {subfolder!r}): "
            f"{e.__class__.__name__}"
        ) from None


def random_context(conditioning: str, context_tokens: int, unet: nn.Module, batch: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """U-Net keyword inputs for ``conditioning`` (``none``, or ``context_tokens`` tokens of the
    U-Net's cross-attention width), filled with seeded noise (cost runs only)."""
    if conditioning == Conditioning.none:
        return {}
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, context_tokens, dim, generator=g)
    p = next(unet.parameters())
    return {"encoder_hidden_states": ctx.to(device=p.device, dtype=p.dtype)}
