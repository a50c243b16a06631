"""Tests for bench/macs.py (CPU only, fast).

Reference values: docs/conventions.md §3 (MACs conventions): SD v1.5
U-Net 338.6 G conv+linear (paper 338.83 G), ≈401.6 G with attention matmuls;
CIFAR-10 U-Net 6.05 G (paper 6.1 G).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.cost import macs
from bench.caching.schedules import uniform_full_calls
from bench.cost.macs import MacCount, average_macs, count_macs, per_image, sdpa_macs

# --------------------------------------------------------------------------- #
# Toy module with hand-computed MACs
# --------------------------------------------------------------------------- #
B, CIN, H, W = 2, 3, 10, 12
C = 8  # conv channels
D_MODEL, HEADS, CTX_LEN = 16, 2, 5
HEAD_DIM = D_MODEL // HEADS


class ToyAttention(nn.Module):
    """Cross-attention: queries from x (B, Lq, D), keys/values from ctx (B, Lk, D)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.to_q = nn.Linear(D_MODEL, D_MODEL)
        self.to_kv = nn.Linear(D_MODEL, 2 * D_MODEL, bias=False)
        self.to_out = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x, ctx):
        b, lq, _ = x.shape
        q = self.to_q(x).view(b, lq, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = self.to_kv(ctx).chunk(2, dim=-1)
        k = k.reshape(b, -1, HEADS, HEAD_DIM).transpose(1, 2)
        v = v.reshape(b, -1, HEADS, HEAD_DIM).transpose(1, 2)
        if self.mode == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.mode == "matmul":
            a = torch.softmax(q @ k.transpose(-1, -2) * HEAD_DIM**-0.5, dim=-1)
            o = a @ v
        elif self.mode == "baddbmm":  # as diffusers' classic AttnProcessor
            q3, k3, v3 = (t.reshape(b * HEADS, -1, HEAD_DIM) for t in (q, k, v))
            bias = torch.zeros(q3.shape[0], q3.shape[1], k3.shape[1], device=x.device, dtype=q3.dtype)
            s = torch.baddbmm(bias, q3, k3.transpose(-1, -2), beta=0, alpha=HEAD_DIM**-0.5)
            o = torch.bmm(s.softmax(-1), v3).view(b, HEADS, lq, HEAD_DIM)
        else:
            raise ValueError(self.mode)
        o = o.transpose(1, 2).reshape(b, lq, D_MODEL)
        return self.to_out(o)


class Toy(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.conv = nn.Conv2d(CIN, C, 3, padding=1)  # -> (B, 8, 10, 12)
        self.norm = nn.GroupNorm(4, C)
        self.act = nn.SiLU()
        self.gconv = nn.Conv2d(C, C, 3, padding=1, groups=4)  # grouped
        self.down = nn.Conv2d(C, D_MODEL, 2, stride=2)  # -> (B, 16, 5, 6)
        self.attn = ToyAttention(mode)
        self.up = nn.ConvTranspose2d(D_MODEL, 4, 2, stride=2)  # -> (B, 4, 10, 12)

    def forward(self, x, ctx):
        h = self.act(self.norm(self.conv(x)))
        h = self.down(self.gconv(h))
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)  # (B, 30, 16) tokens
        t = t + self.attn(t, ctx)
        h = t.transpose(1, 2).reshape(b, c, hh, ww)
        return self.up(F.silu(h))


def toy_expected():
    """Hand-computed MACs of Toy (conv MACs = Cout·(Cin/groups)·kh·kw·Hout·Wout·B)."""
    conv = C * CIN * 3 * 3 * H * W * B  # 8·3·9·120·2 = 51_840
    gconv = C * (C // 4) * 3 * 3 * H * W * B  # 8·2·9·120·2 = 34_560
    hd, wd = H // 2, W // 2
    down = D_MODEL * C * 2 * 2 * hd * wd * B  # 16·8·4·30·2 = 30_720
    # transposed conv: every *input* pixel meets Cout·kh·kw weights per input channel
    up = D_MODEL * 4 * 2 * 2 * hd * wd * B  # 16·4·4·30·2 = 15_360
    lq = hd * wd  # 30 query tokens
    to_q = B * lq * D_MODEL * D_MODEL  # 2·30·16·16 = 15_360
    to_kv = B * CTX_LEN * D_MODEL * 2 * D_MODEL  # 2·5·16·32 = 5_120
    to_out = B * lq * D_MODEL * D_MODEL  # 15_360
    qk = B * HEADS * lq * CTX_LEN * HEAD_DIM  # 2·2·30·5·8 = 4_800
    av = B * HEADS * lq * CTX_LEN * HEAD_DIM  # 4_800
    assert (conv, gconv, down, up) == (51_840, 34_560, 30_720, 15_360)
    assert (to_q, to_kv, qk) == (15_360, 5_120, 4_800)
    paper = conv + gconv + down + up + to_q + to_kv + to_out
    return {
        "Conv2d": conv + gconv + down,
        "ConvTranspose2d": up,
        "Linear": to_q + to_kv + to_out,
        "paper": paper,  # 168_320
        "all": paper + qk + av,  # 177_920
    }


def _toy_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, CIN, H, W, generator=g).to(device)
    ctx = torch.randn(B, CTX_LEN, D_MODEL, generator=g).to(device)
    return x, ctx


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("mode", ["sdpa", "matmul", "baddbmm"])
def test_toy_macs_match_hand_computed(mode, device):
    exp = toy_expected()
    assert exp["paper"] == 168_320 and exp["all"] == 177_920
    with torch.device(device):
        model = Toy(mode)
    m = count_macs(model, *_toy_inputs(device))
    assert m.paper == exp["paper"]
    assert m.all == exp["all"]
    assert m.attention == exp["all"] - exp["paper"]
    assert m.by_module == {k: exp[k] for k in ("Conv2d", "ConvTranspose2d", "Linear")}
    assert sum(m.by_op.values()) == m.all
    # GroupNorm / SiLU / softmax are not counted anywhere
    assert m.by_op["aten.convolution"] == exp["Conv2d"] + exp["ConvTranspose2d"]


def test_sdpa_formula_equals_explicit_matmuls():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 17, 8, generator=g)
    k = torch.randn(3, 4, 11, 8, generator=g)
    v = torch.randn(3, 4, 11, 6, generator=g)  # Ev != E on purpose

    def explicit(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    expected = 3 * 4 * 17 * 11 * 8 + 3 * 4 * 17 * 11 * 6
    assert sdpa_macs(q.shape, k.shape, v.shape) == expected
    m_sdpa = count_macs(F.scaled_dot_product_attention, q, k, v)
    m_mm = count_macs(explicit, q, k, v)
    m_meta = count_macs(F.scaled_dot_product_attention, *(t.to("meta") for t in (q, k, v)))
    assert m_sdpa.all == m_mm.all == m_meta.all == expected
    assert m_sdpa.paper == m_mm.paper == 0  # no conv / linear module involved
    # On CPU, SDPA must not be silently counted as 0 (FlopCounterMode has no
    # formula for the CPU flash kernel; bench.cost registers one).
    assert m_sdpa.all > 0


def test_sdpa_formula_in_counter_for_cpu_flash_kernel():
    aten = torch.ops.aten
    extra = macs._extra_flop_formulas()
    assert aten._scaled_dot_product_flash_attention_for_cpu in extra
    shapes = ((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 7, 4))
    assert extra[aten._scaled_dot_product_flash_attention_for_cpu](*shapes) == 2 * sdpa_macs(*shapes)


def test_no_grad_and_hooks_removed():
    before_pre = len(nn.modules.module._global_forward_pre_hooks)
    before_post = len(nn.modules.module._global_forward_hooks)
    lin = nn.Linear(4, 3)
    seen = []
    count_macs(lambda x: seen.append(torch.is_grad_enabled()) or lin(x), torch.randn(5, 4))
    assert seen == [False]
    assert len(nn.modules.module._global_forward_pre_hooks) == before_pre
    assert len(nn.modules.module._global_forward_hooks) == before_post
    # no hooks outside the context: module calls outside count_macs are free
    m = count_macs(lin, torch.randn(5, 4))
    assert m.paper == m.all == 5 * 4 * 3


def test_nested_counted_modules_not_double_counted():
    class Wrapped(nn.Linear):  # a Linear whose forward calls another Linear
        def __init__(self):
            super().__init__(4, 4)
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(super().forward(x))

    m = count_macs(Wrapped(), torch.randn(3, 4))
    assert m.paper == m.all == 2 * 3 * 4 * 4
    assert m.by_module == {"Wrapped": 2 * 3 * 4 * 4}


# --------------------------------------------------------------------------- #
# Real architectures (docs/conventions.md §3)
# --------------------------------------------------------------------------- #
CIFAR10_CFG = dict(
    block_out_channels=[128, 256, 256, 256],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    in_channels=3,
    out_channels=3,
    sample_size=32,
    attention_head_dim=None,
)

SD15_CFG = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_eps=1e-5,
    norm_num_groups=32,
    sample_size=64,
)


def test_cifar10_unet_macs():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel.from_config(CIFAR10_CFG).eval()  # random weights, CPU
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([500])
    m_cpu = count_macs(unet, x, t)
    # docs/conventions.md §3: 6.05 G conv+linear (paper Table: 6.1 G)
    assert m_cpu.paper == pytest.approx(6.05e9, rel=5e-3)
    assert m_cpu.all > m_cpu.paper  # attention matmuls exist in the 16x16 attention blocks

    with torch.device("meta"):
        unet_meta = diffusers.UNet2DModel.from_config(CIFAR10_CFG)
    m_meta = count_macs(unet_meta, x.to("meta"), t.to("meta"))
    assert (m_meta.paper, m_meta.all) == (m_cpu.paper, m_cpu.all)

    # Classic processor (baddbmm + bmm instead of SDPA): same counts.
    n_attn = 0
    for mod in unet.modules():
        if isinstance(mod, Attention):
            mod.set_processor(AttnProcessor())
            n_attn += 1
    assert n_attn > 0
    m_classic = count_macs(unet, x, t)
    assert (m_classic.paper, m_classic.all) == (m_cpu.paper, m_cpu.all)
    assert "aten.baddbmm" in m_classic.by_op

    # batch 2 costs twice as much; per_image undoes it
    m2 = count_macs(unet_meta, torch.empty(2, 3, 32, 32, device="meta"), t.to("meta").expand(2))
    assert m2.paper == 2 * m_meta.paper
    assert per_image(m2, 2).paper == m_meta.paper


def test_sd15_unet_macs_on_meta():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(SD15_CFG)
        x = torch.empty(1, 4, 64, 64)  # 512² image -> 64² latent
        ctx = torch.empty(1, 77, 768)  # CLIP text context
        t = torch.tensor([999])
    m = count_macs(unet, x, t, encoder_hidden_states=ctx)
    # docs/conventions.md §3: 338.6 G conv+linear (paper 338.83 G); ≈401.6 G with attention
    assert m.paper == pytest.approx(338.6e9, rel=2e-3)
    assert m.all == pytest.approx(401.6e9, rel=1e-2)
    assert set(m.by_module) == {"Conv2d", "Linear"}


# --------------------------------------------------------------------------- #
# per_image / average_macs
# --------------------------------------------------------------------------- #
def _mc(paper, all_):
    return MacCount(paper=paper, all=all_, by_op={"x": all_}, by_module={"y": paper})


def test_per_image_cfg():
    call = _mc(800, 1000)  # U-Net call on a CFG-doubled batch of 2·4 latents
    assert per_image(call, 4, cfg_doubled=True).paper == 100  # paper convention
    assert per_image(call, 4, cfg_doubled=True, count_guidance=True).paper == 200
    assert per_image(call, 4).all == 250
    with pytest.raises(ValueError):
        per_image(call, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 20])
def test_average_macs_uniform(n):
    full, retr = _mc(99.82e9, 104.2e9), _mc(4.42e9, 5.0e9)
    num_calls = 100 if 100 % n == 0 else 60  # N divides num_calls
    avg = average_macs(full, retr, uniform_full_calls(num_calls, n), num_calls)
    assert avg.paper == pytest.approx((full.paper + (n - 1) * retr.paper) / n, rel=1e-12)
    assert avg.all == pytest.approx((full.all + (n - 1) * retr.all) / n, rel=1e-12)
    assert avg.by_op["x"] == pytest.approx(avg.all, rel=1e-12)


def test_average_macs_ldm4g_table1():
    # docs/conventions.md §3: LDM-4-G DDIM-250, full 99.82 G, retrieval 4.42 G -> Table 1 averages
    full, retr = _mc(99.82e9, 0), _mc(4.42e9, 0)
    for n, ref in [(2, 52.1), (3, 36.5), (5, 23.5), (10, 14.0), (20, 9.4)]:
        avg = average_macs(full, retr, uniform_full_calls(250, n), 250)
        assert avg.paper / 1e9 == pytest.approx(ref, abs=0.06)


def test_average_macs_arbitrary_schedule():
    full, retr = _mc(10, 13), _mc(1, 2)
    calls = [0, 1, 2, 7, 11, 12]
    num = 15
    per_call = [full if i in calls else retr for i in range(num)]
    s = MacCount.zero()
    for c in per_call:
        s = s + c
    avg = average_macs(full, retr, calls, num)
    assert avg.paper == pytest.approx(s.paper / num) == pytest.approx((6 * 10 + 9 * 1) / 15)
    assert avg.all == pytest.approx((6 * 13 + 9 * 2) / 15)
    # duplicates are one call; out-of-range indices are an error
    assert average_macs(full, retr, calls + [0], num).paper == avg.paper
    with pytest.raises(ValueError):
        average_macs(full, retr, [15], num)
