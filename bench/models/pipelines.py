"""What surrounds the U-Net of a latent model: conditioning before the loop, decoding after it.

Text-to-image (Stable Diffusion): prompts, CLIP text encoder, KL VAE, from the
subfolders a Stable Diffusion repository has (``text_encoder``, ``tokenizer``,
``vae``). Class-conditional (LDM-4-G): class labels, the learned class embedding,
the VQ-f4 autoencoder, from a directory written by ``python -m bench.convert ldm``
(``class_embedder``, ``vqvae``). Both are loaded from the same diffusers directory
(hub id or local path) as the U-Net. None of this runs inside the timed denoising
loop: conditioning is computed before it and latents decoded after it, as the
paper's throughput excludes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.core.errors import HarnessError
from bench.core.images import to_uint8
from bench.core.options import LabelMode, value
from bench.core.seeds import sample_seed
from bench.models.loading import ModelSpec, weights_fingerprint


@dataclass(frozen=True)
class PromptSpec:
    """Where a text-conditioned model's prompts come from (``conf/prompts/*.yaml``)."""

    name: str | None = None  # the prompt set's name, e.g. coco2017
    source: str | None = None  # .txt (one per line), .json list, or a Hugging Face dataset
    column: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class LabelSpec:
    """The class label rule of a class-conditional model (``run.labels``)."""

    mode: str = LabelMode.random.value
    per_class: int = 50
    list: tuple[int, ...] = ()


@dataclass(frozen=True)
class InputSpec:
    """What a pipeline conditions sample ``i`` on: prompt ``i`` or the label rule, for
    ``num_samples`` samples under base ``seed``."""

    seed: int = 0
    num_samples: int = 1
    prompts: PromptSpec = field(default_factory=PromptSpec)
    labels: LabelSpec = field(default_factory=LabelSpec)


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


def _decoded_shape(config: Any, sample_shape: tuple[int, int, int], channels: int = 3) -> tuple[int, int, int]:
    """(H, W, C) an autoencoder decodes latents of ``sample_shape`` to: each level but the last
    of its ``block_out_channels`` halves the resolution (diffusers' VAE / VQ-VAE)."""
    factor = 2 ** (len(config.block_out_channels) - 1)
    return sample_shape[1] * factor, sample_shape[2] * factor, int(config.get("out_channels", channels))


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

    def __init__(self, model: ModelSpec | None = None, inputs: InputSpec | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        pass

    def key(self) -> dict[str, Any]:
        return {}

    def image_shape(self, sample_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(H, W, C) of a stored image from the loop's sample shape (C, H, W)."""
        c, h, w = sample_shape
        return h, w, c

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

    def __init__(self, model: ModelSpec, inputs: InputSpec, device: str, dtype: torch.dtype):
        p = inputs.prompts
        if p.source is None:
            raise HarnessError(
                f"model {model.name} is text-conditioned: set run.prompts.source "
                "(a .txt/.json file of prompts or a Hugging Face dataset with run.prompts.column)"
            )
        self.prompts = load_prompts(p.source, p.column, p.split)
        if inputs.num_samples > len(self.prompts):
            raise HarnessError(
                f"run.num_samples={inputs.num_samples} exceeds the {len(self.prompts)} prompts of {p.source!r}"
            )
        self.text = TextConditioner(model.pretrained, device, dtype)
        self.decode = VaeDecoder(model.pretrained, device, dtype)
        self.guidance_scale = model.guidance_scale
        self._empty: dict[str, torch.Tensor] | None = None

    def key(self) -> dict[str, Any]:
        return {
            "prompts": prompts_digest(self.prompts), "guidance_scale": self.guidance_scale,
            "text_encoder": weights_fingerprint(self.text.encoder), "vae": weights_fingerprint(self.decode.vae),
        }

    def prompts_for(self, indices: range) -> list[str]:
        return [self.prompts[i] for i in indices]

    def image_shape(self, sample_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return _decoded_shape(self.decode.vae.config, sample_shape)

    def conditioning(self, indices: range) -> tuple[dict, dict | None]:
        cond = self.text.encode(self.prompts_for(indices))
        if self.guidance_scale <= 1:
            return cond, None
        if self._empty is None:
            self._empty = self.text.encode([""])
        uncond = {k: v.expand(len(indices), *v.shape[1:]) for k, v in self._empty.items()}
        return cond, uncond


# ---------------------------------------------------------------- class-conditional (LDM-4-G)

LABEL_STREAM = 0x6C61  # keeps a sample's label draw apart from its noise, which uses the same seed


def class_labels(rule: LabelSpec, seed: int, indices: range | list[int], num_classes: int) -> list[int]:
    """The class label of each sample index under ``run.labels``.

    ``random``: uniform over ``num_classes``, drawn from sample ``i``'s own seed
    (:func:`bench.core.seeds.sample_seed`), so it depends only on ``(seed, i)``; the
    paper's protocol (the authors' ``experiments/ldm/sample_ddp_deepcache.py`` draws
    ``torch.randint(0, 1000)`` labels, as guided-diffusion's sampling scripts do);
    ``per_class``: ``per_class`` samples of each class in class order (sample ``i``
    is class ``i // per_class``; 50 per class gives a class-balanced 50k);
    ``list``: sample ``i`` is ``list[i]``.
    """
    mode = value(rule.mode)
    if mode == LabelMode.random:
        return [int(np.random.default_rng([sample_seed(seed, i), LABEL_STREAM]).integers(num_classes))
                for i in indices]
    if mode == LabelMode.per_class:
        return [i // rule.per_class for i in indices]
    return [int(rule.list[i]) for i in indices]


def check_labels(rule: LabelSpec, num_samples: int, num_classes: int) -> None:
    """Fail before generating when ``run.labels`` cannot label ``num_samples`` samples."""
    mode = value(rule.mode)
    if mode == LabelMode.per_class:
        if rule.per_class < 1:
            raise HarnessError(f"run.labels.per_class must be >= 1, got {rule.per_class}")
        if num_samples > rule.per_class * num_classes:
            raise HarnessError(
                f"run.num_samples={num_samples} exceeds run.labels.per_class={rule.per_class} x {num_classes} classes"
            )
    elif mode == LabelMode.list:
        if num_samples > len(rule.list):
            raise HarnessError(f"run.num_samples={num_samples} exceeds the {len(rule.list)} labels of run.labels.list")
        bad = sorted({int(y) for y in rule.list[:num_samples] if not 0 <= int(y) < num_classes})
        if bad:
            raise HarnessError(f"run.labels.list holds {bad[:5]}, outside the classes 0..{num_classes - 1}")


class VqDecoder:
    """Latents -> uint8 images through the VQ autoencoder (LDM's ``decode_first_stage``
    of a ``VQModelInterface``: divide by the scale factor, quantize to the nearest
    codebook entry, decode). Runs in float32 whatever ``run.dtype``: the nearest-code
    search is where half precision could change the result."""

    def __init__(self, where: str, device: str):
        from diffusers import VQModel

        self.vq = _from_pretrained(VQModel, where, "vqvae")
        if self.vq.dtype != torch.float32:
            self.vq.float()
        self.vq.to(device=device).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        z = latents.to(self.vq.device, torch.float32) / self.vq.config.scaling_factor
        return to_uint8(self.vq.decode(z).sample)


class ClassToImage:
    """Per-sample conditioning and decoding for a class-conditional latent model (LDM-4-G).

    Sample ``i`` gets the label ``class_labels(run.labels, run.seed, [i])``; its
    context is that label's row of the learned class embedding, one token long.
    Classifier-free guidance (``model.guidance_scale`` > 1; 1.5 in the paper) pairs
    it with the null class, as CompVis/latent-diffusion's ImageNet sampling does
    (``scripts/latent_imagenet_diffusion.ipynb``: unconditional label 1000).
    """

    def __init__(self, model: ModelSpec, inputs: InputSpec, device: str, dtype: torch.dtype):
        from bench.models.ldm import SUBFOLDER, ClassEmbedder

        self.rule = inputs.labels
        self.seed = inputs.seed
        self.embedder = _from_pretrained(ClassEmbedder, model.pretrained, SUBFOLDER)
        self.embedder.to(device=device).eval().requires_grad_(False)
        self.dtype = dtype
        self.num_classes = self.embedder.config.num_classes
        self.null_class = self.embedder.config.null_class
        check_labels(self.rule, inputs.num_samples, self.num_classes)
        self.guidance_scale = model.guidance_scale
        if self.guidance_scale > 1 and self.null_class is None:
            raise HarnessError(
                f"model.guidance_scale={self.guidance_scale} needs a null class, which the class embedding of "
                f"{model.pretrained!r} lacks; set model.guidance_scale=1"
            )
        self.decode = VqDecoder(model.pretrained, device)

    def key(self) -> dict[str, Any]:
        mode = value(self.rule.mode)
        labels: dict[str, Any] = {"mode": mode, "num_classes": self.num_classes}
        if mode == LabelMode.random:
            labels["stream"] = LABEL_STREAM
        elif mode == LabelMode.per_class:
            labels["per_class"] = self.rule.per_class
        else:
            labels["list"] = hashlib.sha256(json.dumps([int(y) for y in self.rule.list]).encode()).hexdigest()[:16]
        return {
            "labels": labels, "guidance_scale": self.guidance_scale, "null_class": self.null_class,
            "class_embedder": weights_fingerprint(self.embedder), "vqvae": weights_fingerprint(self.decode.vq),
            "decode_dtype": "float32",
        }

    def image_shape(self, sample_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return _decoded_shape(self.decode.vq.config, sample_shape)

    def prompts_for(self, indices: range) -> list[int]:
        """The class labels of ``indices`` (what the evaluator gets in place of prompts)."""
        return class_labels(self.rule, self.seed, indices, self.num_classes)

    @torch.inference_mode()
    def _context(self, labels: list[int]) -> dict[str, torch.Tensor]:
        y = torch.tensor(labels, dtype=torch.long, device=self.embedder.device)
        return {"encoder_hidden_states": self.embedder(y).to(self.dtype)}

    def conditioning(self, indices: range) -> tuple[dict, dict | None]:
        cond = self._context(self.prompts_for(indices))
        if self.guidance_scale <= 1:
            return cond, None
        return cond, self._context([self.null_class] * len(indices))
