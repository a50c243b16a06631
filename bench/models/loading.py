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
from omegaconf import OmegaConf
from torch import nn

from bench.core.errors import HarnessError
from bench.caching.engine import CacheError, CacheSettings


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


def load_model(mcfg: Any, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build the U-Net and read the scheduler config described by a model config."""
    cls = get_class(mcfg.unet_class)
    if mcfg.weights == "random":
        unet_config = cls.load_config(mcfg.arch, subfolder="unet")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mcfg.init_seed)
            unet = cls.from_config(unet_config)
        scheduler_config = _scheduler_config(mcfg.arch, "scheduler", mcfg)
        source = f"random:{mcfg.init_seed}"
    else:
        if OmegaConf.is_config(mcfg) and OmegaConf.is_missing(mcfg, "pretrained"):
            raise HarnessError(
                f"model {mcfg.name} has no default weights: set model.pretrained=<hub id or local diffusers "
                "directory> (or model.weights=random with run.mode=cost)"
            )
        unet = _from_pretrained(cls, mcfg.pretrained, mcfg.subfolder)
        scheduler_config = _scheduler_config(mcfg.pretrained, mcfg.scheduler_subfolder, mcfg)
        source = str(mcfg.pretrained)
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


def _scheduler_config(where: str, subfolder: str | None, mcfg: Any) -> dict[str, Any]:
    from diffusers import DDPMScheduler  # any scheduler class reads scheduler_config.json

    try:
        return dict(DDPMScheduler.load_config(where, subfolder=subfolder))
    except (OSError, ValueError) as e:
        raise HarnessError(
            f"model {mcfg.name}: no scheduler config in {where!r} (subfolder {subfolder!r}): "
            f"{e.__class__.__name__}"
        ) from None


def cache_settings(ccfg: Any, mcfg: Any, prompt_set: str | None = None) -> CacheSettings:
    """Resolve the cache config against the model's paper defaults.

    ``cache.branch`` null -> the model's ``default_branch`` (DDPM 3, LDM 1, SD 2);
    ``cache.center``/``cache.power`` null -> the model's per-interval table for the prompt
    set ``prompt_set`` (supp. Table 10), else its per-interval table (supp. Table 9),
    else its default.
    """
    schedule = getattr(ccfg.schedule, "value", ccfg.schedule)
    branch = ccfg.branch if ccfg.branch is not None else mcfg.default_branch
    center, power = ccfg.center, ccfg.power
    if schedule == "nonuniform" and (center is None or power is None):
        by_prompts = mcfg.get("nonuniform_by_prompts") or {}
        table = (by_prompts.get(prompt_set) if prompt_set else None) or mcfg.nonuniform_by_interval or {}
        params = table.get(ccfg.interval, mcfg.nonuniform_default)
        center = params.center if center is None else center
        power = params.power if power is None else power
    try:
        return CacheSettings(
            interval=ccfg.interval, branch=branch, schedule=schedule, center=center, power=power
        )
    except CacheError as e:
        raise HarnessError(str(e)) from None


def random_context(mcfg: Any, unet: nn.Module, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """U-Net keyword inputs for conditioning, filled with seeded noise (cost runs only)."""
    if mcfg["conditioning"] == "none":
        return {}
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, mcfg["context_tokens"], dim, generator=g)
    p = next(unet.parameters())
    return {"encoder_hidden_states": ctx.to(device=p.device, dtype=p.dtype)}
