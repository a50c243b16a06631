"""The class-conditional latent diffusion model of CompVis/latent-diffusion (LDM-4-G,
``cin256-v2``), re-implemented compactly for the tests: the same module tree, hence
the same ``state_dict`` keys as the original checkpoint, and the same forward
passes. It is written from the original code, independently of diffusers, so the
converted model can be checked against it.

Sources (CompVis/latent-diffusion unless noted):

- ``ldm/modules/diffusionmodules/openaimodel.py``: ``UNetModel``, ``ResBlock``,
  ``Downsample``, ``Upsample``, ``TimestepEmbedSequential``
- ``ldm/modules/diffusionmodules/util.py``: ``timestep_embedding``, ``GroupNorm32``,
  ``make_beta_schedule``, ``make_ddim_timesteps``, ``make_ddim_sampling_parameters``
- ``ldm/modules/attention.py``: ``SpatialTransformer``, ``BasicTransformerBlock``,
  ``CrossAttention``, ``FeedForward``, ``GEGLU``
- ``ldm/modules/encoders/modules.py``: ``ClassEmbedder``
- ``ldm/modules/diffusionmodules/model.py``: ``Encoder``, ``Decoder``, ``ResnetBlock``,
  ``AttnBlock``, ``Upsample``, ``Downsample``
- ``ldm/models/autoencoder.py``: ``VQModelInterface``; CompVis/taming-transformers
  ``taming/modules/vqvae/quantize.py``: ``VectorQuantizer2``
- ``ldm/models/diffusion/ddpm.py``: ``LatentDiffusion`` (key prefixes, the schedule
  buffers of ``register_schedule``)
- ``ldm/models/diffusion/ddim.py``: ``DDIMSampler.p_sample_ddim`` with classifier-free
  guidance

Only what ``cin256-v2`` uses is here: no scale-shift norm, no residual
up/down-sampling blocks, no gradient checkpointing, no training losses.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- U-Net (openaimodel.py)


class GroupNorm32(nn.GroupNorm):
    """Normalises half precision in float32, as the original; float64 (the tests'
    exact comparisons) stays float64."""

    def forward(self, x):
        if x.dtype == torch.float64:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None].to(timesteps.device)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        self.out_layers = nn.Sequential(
            normalization(out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        h = self.heads

        def split(t):  # b n (h d) -> (b h) n d
            b, n, _ = t.shape
            return t.reshape(b, n, h, -1).permute(0, 2, 1, 3).reshape(b * h, n, -1)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attn = (torch.einsum("bid,bjd->bij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bij,bjd->bid", attn, v)
        bh, n, d = out.shape
        out = out.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int | None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int, context_dim: int | None):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.proj_out(x) + x_in


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """``openaimodel.UNetModel`` with ``use_spatial_transformer=True`` (legacy head
    sizing: ``num_heads`` heads of ``ch // num_heads`` channels)."""

    def __init__(self, *, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult=(1, 2, 4, 8), num_heads=-1, transformer_depth=1, context_dim=None,
                 use_spatial_transformer=True, **ignored: Any):
        super().__init__()
        assert use_spatial_transformer and context_dim is not None
        self.model_channels = model_channels
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )

        def transformer(ch):
            return SpatialTransformer(ch, num_heads, ch // num_heads, transformer_depth, context_dim)

        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim), transformer(ch), ResBlock(ch, emb_dim))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb_dim, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None):
        t_emb = timestep_embedding(timesteps, self.model_channels)  # float32, as the original
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


class ClassEmbedder(nn.Module):
    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.embedding(batch[self.key][:, None])  # B x 1 x embed_dim: a 1-token context


# ---------------------------------------------------------------- VQ autoencoder (model.py, quantize.py)


def Normalize(channels: int) -> nn.Module:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def nonlinearity(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int | None = None):
        super().__init__()
        out = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out, 3, padding=1)
        self.norm2 = Normalize(out)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1)
        if in_channels != out:
            self.nin_shortcut = nn.Conv2d(in_channels, out, 1)

    def forward(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** -0.5)
        w_ = torch.softmax(w_, dim=2)
        h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class VQUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=True, **ignored: Any):
        super().__init__()
        assert not attn_resolutions
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for level in range(self.num_resolutions):
            block, block_in = nn.ModuleList(), ch * in_mult[level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
            down = nn.Module()
            down.block, down.attn = block, nn.ModuleList()
            if level != self.num_resolutions - 1:
                down.downsample = VQDownsample(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in range(self.num_resolutions):
            for i in range(self.num_res_blocks):
                h = self.down[level].block[i](h)
            if level != self.num_resolutions - 1:
                h = self.down[level].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, **ignored: Any):
        super().__init__()
        assert not attn_resolutions
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
            up = nn.Module()
            up.block, up.attn = block, nn.ModuleList()
            if level != 0:
                up.upsample = VQUpsample(block_in)
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            for i in range(self.num_res_blocks + 1):
                h = self.up[level].block[i](h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class VectorQuantizer2(nn.Module):
    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z):
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.e_dim)
        e = self.embedding.weight
        d = (flat ** 2).sum(dim=1, keepdim=True) + (e ** 2).sum(dim=1) - 2 * torch.einsum("bd,dn->bn", flat, e.t())
        idx = torch.argmin(d, dim=1)
        z_q = self.embedding(idx).view(z.shape)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)  # legacy
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (None, None, idx)


class VQModelInterface(nn.Module):
    def __init__(self, *, ddconfig: dict, n_embed: int, embed_dim: int, **ignored: Any):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = nn.Identity()
        self.quantize = VectorQuantizer2(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, force_not_quantize: bool = False):
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


# ---------------------------------------------------------------- the whole model (ddpm.py, ddim.py)


class DiffusionWrapper(nn.Module):
    def __init__(self, unet_params: dict):
        super().__init__()
        self.diffusion_model = UNetModel(**unet_params)

    def forward(self, x, t, c_crossattn: torch.Tensor):
        return self.diffusion_model(x, t, context=c_crossattn)


class LitEmaCounters(nn.Module):
    """What ``ldm/modules/ema.py``'s ``LitEma`` leaves in a checkpoint of a model
    without EMA weights: its two counters (the published ``model.ckpt`` holds them)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("decay", torch.tensor(0.9999, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))


class LatentDiffusion(nn.Module):
    """``ldm.models.diffusion.ddpm.LatentDiffusion`` for ``conditioning_key: crossattn``
    with a class embedder: the parameters and buffers of the original, nothing else."""

    def __init__(self, params: dict, ema_counters: bool = True):
        super().__init__()
        self.num_timesteps = params.get("timesteps", 1000)
        self.scale_factor = params.get("scale_factor", 1.0)
        self.cond_key = params["cond_stage_key"]
        self.model = DiffusionWrapper(params["unet_config"]["params"])
        if ema_counters:
            self.model_ema = LitEmaCounters()
        self.register_schedule(params.get("linear_start", 1e-4), params.get("linear_end", 2e-2))
        self.first_stage_model = VQModelInterface(**params["first_stage_config"]["params"])
        cp = params["cond_stage_config"]["params"]
        self.cond_stage_model = ClassEmbedder(cp["embed_dim"], cp.get("n_classes", 1000), cp.get("key", "class"))

    def register_schedule(self, linear_start: float, linear_end: float) -> None:
        """``DDPM.register_schedule`` with the "linear" schedule (linear in sqrt(beta))."""
        betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, self.num_timesteps,
                                dtype=torch.float64) ** 2).numpy()
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    def apply_model(self, x, t, cond):
        return self.model(x, t, c_crossattn=cond)

    def get_learned_conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        return self.cond_stage_model({self.cond_key: labels})

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


@torch.no_grad()
def ddim_sample(ldm: LatentDiffusion, x_T: torch.Tensor, labels: torch.Tensor, steps: int, scale: float,
                null_class: int) -> torch.Tensor:
    """``DDIMSampler.sample`` with eta 0, uniform discretisation and classifier-free
    guidance (``unconditional_conditioning`` = the null class), as the LDM ImageNet
    notebook samples; returns the final latents."""
    c = ldm.get_learned_conditioning(labels)
    uc = ldm.get_learned_conditioning(torch.full_like(labels, null_class))
    ac = ldm.alphas_cumprod
    ts = np.asarray(list(range(0, ldm.num_timesteps, ldm.num_timesteps // steps))) + 1  # make_ddim_timesteps
    alphas = ac[ts]
    alphas_prev = torch.tensor([ac[0].item()] + ac[ts[:-1]].tolist())
    sqrt_one_minus = torch.sqrt(1.0 - alphas)
    x, b = x_T, x_T.shape[0]
    for i, step in enumerate(np.flip(ts)):
        index = len(ts) - i - 1
        t = torch.full((b,), int(step), dtype=torch.long)
        e_u, e_c = ldm.apply_model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uc, c])).chunk(2)
        e_t = e_u + scale * (e_c - e_u)
        pred_x0 = (x - sqrt_one_minus[index] * e_t) / alphas[index].sqrt()
        x = alphas_prev[index].sqrt() * pred_x0 + (1.0 - alphas_prev[index]).sqrt() * e_t
    return x


# ---------------------------------------------------------------- a tiny checkpoint for the tests

REAL_CONFIG = Path(__file__).resolve().parent / "data" / "cin256-v2.yaml"


def tiny_cin256_config() -> dict:
    """The real ``cin256-v2.yaml`` with small widths: the same structure (four U-Net
    levels, cross-attention at the three lower ones and the middle, VQ-f4 without
    attention blocks, 1001 class embeddings), 8x8 latents, 32x32 images."""
    config = copy.deepcopy(yaml.safe_load(REAL_CONFIG.read_text()))
    p = config["model"]["params"]
    p["image_size"] = 8
    p["unet_config"]["params"].update(image_size=8, model_channels=32, channel_mult=[1, 1, 2, 2], context_dim=32)
    p["first_stage_config"]["params"]["n_embed"] = 16
    p["first_stage_config"]["params"]["ddconfig"].update(resolution=32, ch=32)
    p["cond_stage_config"]["params"]["embed_dim"] = 32
    return config


def tiny_ldm(seed: int = 0) -> LatentDiffusion:
    """The tiny model with seeded weights; no parameter is left constant (norm gains
    and biases are perturbed, the codebook spans the latents' range)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LatentDiffusion(tiny_cin256_config()["model"]["params"])
        with torch.no_grad():
            for p in model.parameters():
                if p.min() == p.max():
                    p.add_(0.1 * torch.randn_like(p))
            model.first_stage_model.quantize.embedding.weight.normal_()
    return model.eval().requires_grad_(False)


def write_tiny_checkpoint(root: Path, seed: int = 0) -> tuple[LatentDiffusion, Path, Path]:
    """``model.ckpt`` (a Lightning-style ``{"state_dict": ...}``) and its yaml under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    model = tiny_ldm(seed)
    ckpt, config = root / "model.ckpt", root / "cin256-v2-tiny.yaml"
    torch.save({"state_dict": model.state_dict(), "global_step": 1, "epoch": 0}, ckpt)
    config.write_text(yaml.safe_dump(tiny_cin256_config()))
    return model, ckpt, config
