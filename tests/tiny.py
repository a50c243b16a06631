"""Tiny and real-architecture models built offline for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

ARCHS = Path(__file__).resolve().parent.parent / "bench" / "archs"


def seeded(fn):
    def wrapper(*args, seed: int = 0, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(*args, **kwargs).eval().requires_grad_(False)

    return wrapper


@seeded
def cifar10_unet() -> UNet2DModel:
    """The real CIFAR-10 DDPM architecture (google/ddpm-cifar10-32), random weights."""
    return UNet2DModel.from_config(UNet2DModel.load_config(str(ARCHS / "ddpm_cifar10"), subfolder="unet"))


@seeded
def tiny_unet2d() -> UNet2DModel:
    """CIFAR-10 block layout (12 skips), tiny widths."""
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


@seeded
def tiny_unet2d_cond(cross_attention_dim: int = 16) -> UNet2DConditionModel:
    """Stable-Diffusion block layout (12 skips), tiny widths."""
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=4, attention_head_dim=2,
        cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def write_tiny_clip_tokenizer(path: Path) -> Path:
    """A character-level CLIP BPE vocabulary (no merges), written by the test."""
    path.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


def tiny_sd_pipeline(tmp_path: Path, scheduler_cls=None):
    """A tiny random Stable Diffusion pipeline assembled offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer(
        str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4, sample_size=32,
        ).eval()
    unet = tiny_unet2d_cond(cross_attention_dim=16)
    scheduler = (scheduler_cls or DDIMScheduler)(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
