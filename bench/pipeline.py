"""What surrounds the U-Net of a latent text-to-image model: prompts, text encoder, VAE.

Loaded from the same diffusers directory (hub id or local path) as the U-Net, from
the subfolders a Stable Diffusion repository has (``text_encoder``, ``tokenizer``,
``vae``). None of this runs inside the timed denoising loop: prompts are encoded
before it and latents decoded after it, as the paper's throughput excludes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.config import HarnessError
from bench.images import to_uint8


def load_prompts(source: str, column: str | None = None, split: str | None = None) -> list[str]:
    """Prompts from a ``.txt`` file (one per line), a ``.json`` list, or a Hugging Face dataset.

    For a dataset (hub name or local directory, e.g. ``phiyodr/coco2017`` with column
    ``captions``, ``nateraw/parti-prompts`` with column ``Prompt``), a column of lists
    contributes its first entry (the first caption of each COCO image, as the paper).
    """
    path = Path(source)
    if path.suffix in (".txt", ".json") and not path.is_file():
        raise HarnessError(f"run.prompts.source={source!r}: no such file")
    if path.suffix == ".txt" and path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json" and path.is_file():
        prompts = [str(p) for p in json.loads(path.read_text())]
    else:
        if column is None:
            raise HarnessError(f"run.prompts.column is needed to read prompts from the dataset {source!r}")
        import datasets

        try:
            ds = datasets.load_dataset(source, split=split or "train")
        except Exception as e:  # datasets raises many kinds; offline it is a ConnectionError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HarnessError(f"run.prompts.source={source!r}: cannot load the dataset ({first})") from None
        if column not in ds.column_names:
            raise HarnessError(f"run.prompts.column={column!r} is not one of {ds.column_names}")
        prompts = [v[0] if isinstance(v, (list, tuple)) else str(v) for v in ds[column]]
    if not prompts:
        raise HarnessError(f"run.prompts.source={source!r} holds no prompts")
    return prompts


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _from_pretrained(cls: type, where: str, subfolder: str) -> Any:
    try:
        return cls.from_pretrained(where, subfolder=subfolder)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise HarnessError(f"model.pretrained={where!r}: cannot load {subfolder}/ ({first})") from None


class TextConditioner:
    """CLIP text encoder + tokenizer of a Stable Diffusion directory."""

    def __init__(self, where: str, device: str, dtype: torch.dtype):
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = _from_pretrained(CLIPTokenizer, where, "tokenizer")
        self.encoder = _from_pretrained(CLIPTextModel, where, "text_encoder")
        self.encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.encoder.device)
        return {"encoder_hidden_states": self.encoder(tokens)[0]}


class VaeDecoder:
    """Latents -> uint8 images through the model's ``AutoencoderKL``."""

    def __init__(self, where: str, device: str, dtype: torch.dtype):
        from diffusers import AutoencoderKL

        self.vae = _from_pretrained(AutoencoderKL, where, "vae")
        self.vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return to_uint8(x)


class Pixels:
    """A pixel-space model: no conditioning, samples in [-1, 1] are the images."""

    guidance_scale = 1.0

    def __init__(self, mcfg: Any = None, rcfg: Any = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
        pass

    def key(self) -> dict[str, Any]:
        return {}

    def prompts_for(self, indices: range) -> None:
        return None

    def conditioning(self, indices: range) -> tuple[dict, None]:
        return {}, None

    def decode(self, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x)


class TextToImage:
    """Per-sample conditioning and decoding for a text-conditioned latent model.

    Sample ``i`` is generated from prompt ``i``; classifier-free guidance pairs it
    with the empty prompt.
    """

    def __init__(self, mcfg: Any, rcfg: Any, device: str, dtype: torch.dtype):
        p = rcfg.prompts
        if p is None or p.source is None:
            raise HarnessError(
                f"model {mcfg.name} is text-conditioned: set run.prompts.source "
                "(a .txt/.json file of prompts or a Hugging Face dataset with run.prompts.column)"
            )
        self.prompts = load_prompts(p.source, p.column, p.split)
        if rcfg.num_samples > len(self.prompts):
            raise HarnessError(
                f"run.num_samples={rcfg.num_samples} exceeds the {len(self.prompts)} prompts of {p.source!r}"
            )
        self.text = TextConditioner(mcfg.pretrained, device, dtype)
        self.decode = VaeDecoder(mcfg.pretrained, device, dtype)
        self.guidance_scale = mcfg.guidance_scale
        self._empty: dict[str, torch.Tensor] | None = None

    def key(self) -> dict[str, Any]:
        return {"prompts": prompts_digest(self.prompts), "guidance_scale": self.guidance_scale}

    def prompts_for(self, indices: range) -> list[str]:
        return [self.prompts[i] for i in indices]

    def conditioning(self, indices: range) -> tuple[dict, dict | None]:
        cond = self.text.encode(self.prompts_for(indices))
        if self.guidance_scale <= 1:
            return cond, None
        if self._empty is None:
            self._empty = self.text.encode([""])
        uncond = {k: v.expand(len(indices), *v.shape[1:]) for k, v in self._empty.items()}
        return cond, uncond
