"""BK-SDM (main Table 3's comparison rows): the shipped architectures and DeepCache on a U-Net
without a mid block."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from bench.caching.engine import CacheSettings, deepcache, skip_table
from tiny import ARCHS

# U-Net parameters in the authors' model card (Nota-NetsPresso/BK-SDM MODEL_CARD.md), in B
CARD = {"bk_sdm_base": 0.58, "bk_sdm_small": 0.49, "bk_sdm_tiny": 0.33}


def _meta(name: str) -> UNet2DConditionModel:
    config = UNet2DConditionModel.load_config(str(ARCHS / name), subfolder="unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("name", CARD)
def test_the_shipped_architectures_have_the_published_size(name):
    unet = _meta(name)
    params = sum(p.numel() for p in unet.parameters()) / 1e9
    assert abs(params - CARD[name]) < 0.01, params
    assert params < sum(p.numel() for p in _meta("sd15").parameters()) / 1e9
    # one layer per down stage, two per up stage; Small and Tiny have no mid block
    assert all(len(b.resnets) == 1 for b in unet.down_blocks) and all(len(b.resnets) == 2 for b in unet.up_blocks)
    assert (unet.mid_block is None) == (name != "bk_sdm_base")
    assert len(unet.down_blocks) == (3 if name == "bk_sdm_tiny" else 4)


@pytest.mark.parametrize("mid", [None, "UNetMidBlock2DCrossAttn"])
def test_retrieval_is_exact_for_every_branch_with_and_without_a_mid_block(mid):
    """A retrieval call on the input of the full call that filled the cache equals it
    (docs/conventions.md §1), also where the U-Net has no mid block (BK-SDM-Small, -Tiny)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, mid_block_type=mid,
            block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=2, cross_attention_dim=16,
            down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        ).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        ref = unet(x, 500, encoder_hidden_states=ctx).sample
        table = skip_table(unet)
        assert len(table) == 6
        for s in table:
            with deepcache(unet, CacheSettings(interval=2, branch=s.branch)) as state:
                full = unet(x, 500, encoder_hidden_states=ctx).sample
                retr = unet(x, 500, encoder_hidden_states=ctx).sample
            assert state.retrieval_calls == 1
            assert torch.equal(full, ref) and torch.equal(retr, full), s.branch
