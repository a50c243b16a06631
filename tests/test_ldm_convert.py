"""``python -m bench.convert ldm``: CompVis/latent-diffusion's LDM-4-G checkpoint -> diffusers layout.

A tiny checkpoint in the original key layout is written from an independent
re-implementation of the original modules (``ldm_original.py``), converted by the
command a user runs, and the converted U-Net, VQ autoencoder and class embedding
are checked against the original forward passes. The real ``cin256-v2.yaml`` must
give the shipped architecture (and with it the paper's Table 1 MACs).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bench.caching.method import apply
from bench.models import convert
from bench.cost import macs
from bench.cost import measure
from bench.caching.engine import CacheSettings
from bench.models.loading import LoadedModel
from bench.caching.schedules import uniform_full_calls
from harness import ROOT, compose_cfg
from bench.run.parts import model_spec
import ldm_original as lo


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.convert", "ldm", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_tiny")
    model, ckpt, config = lo.write_tiny_checkpoint(root)
    return model, ckpt, config


@pytest.fixture(scope="module")
def converted(tiny):
    from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

    from bench.models.ldm import ClassEmbedder

    _, ckpt, config = tiny
    out = ckpt.parent / "converted"
    r = run_convert(ckpt, config, out)
    assert r.returncode == 0, r.stderr
    assert f"converted: {out}" in r.stdout
    return {
        "dir": out,
        "unet": UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval(),
        "vqvae": VQModel.from_pretrained(out, subfolder="vqvae").eval(),
        "class_embedder": ClassEmbedder.from_pretrained(out, subfolder="class_embedder").eval(),
        "scheduler": DDIMScheduler.from_pretrained(out, subfolder="scheduler"),
    }


@pytest.mark.integration
def test_layout_and_manifest(converted, tiny):
    out = converted["dir"]
    for sub in ("unet", "vqvae", "class_embedder"):
        assert (out / sub / "config.json").is_file() and (out / sub / convert.WEIGHTS_NAME).is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vqvae"] == ["diffusers", "VQModel"]
    assert index["class_embedder"] == ["bench.models.ldm", "ClassEmbedder"]
    source = index["converted_from"]
    assert source["checkpoint"] == "model.ckpt" and source["checkpoint_sha256"] == convert._sha256(tiny[1])
    assert source["checkpoint_keys"] == len(tiny[0].state_dict())
    assert not list(out.parent.glob(".converted.*"))  # no temporary directory left


@pytest.mark.integration
def test_unet_equals_the_original_forward(converted, tiny):
    """Compared in float64, where the two agree to ~1e-15 and any mis-mapped weight or
    setting stands out (one GroupNorm's eps 1e-5 instead of 1e-6 moves the output by
    ~1e-5); float32 rounding alone reaches ~1e-4 on this tiny, ill-conditioned net."""
    original, unet = copy.deepcopy(tiny[0]).double(), copy.deepcopy(converted["unet"]).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 251, 640, 999])
    ctx = original.get_learned_conditioning(torch.tensor([0, 17, 999, 1000]))
    with torch.no_grad():
        ref = original.apply_model(x, t, ctx)
        ours = unet(x, t, encoder_hidden_states=ctx).sample
    assert ref.abs().mean() > 0.1
    assert (ours - ref).abs().max() < 1e-10
    with torch.no_grad():  # and in float32, within its rounding
        ref32 = tiny[0].apply_model(x.float(), t, ctx.float())
        ours32 = converted["unet"](x.float(), t, encoder_hidden_states=ctx.float()).sample
    assert (ours32 - ref32).abs().max() < 1e-3


def test_vq_autoencoder_equals_the_original(converted, tiny):
    original, vq = copy.deepcopy(tiny[0]).double(), copy.deepcopy(converted["vqvae"]).double()
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    images = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        ref = original.decode_first_stage(z)  # quantize, post_quant_conv, decoder
        ours = vq.decode(z / vq.config.scaling_factor).sample
        assert ref.shape == ours.shape == (2, 3, 32, 32) and ref.abs().mean() > 0.1
        assert (ours - ref).abs().max() < 1e-10
        assert (vq.encode(images).latents - original.first_stage_model.encode(images)).abs().max() < 1e-10
        codes = original.first_stage_model.quantize.embedding.weight
        assert torch.equal(vq.quantize.embedding.weight, codes)
    assert vq.config.scaling_factor == 1.0 and vq.config.num_vq_embeddings == 16


def test_class_embedding_rows(converted, tiny):
    embedder = converted["class_embedder"]
    assert embedder.config.num_classes == 1000 and embedder.config.null_class == 1000
    labels = torch.tensor([0, 5, 999, 1000])
    with torch.no_grad():
        ours = embedder(labels)
    assert ours.shape == (4, 1, 32)
    assert torch.equal(ours, tiny[0].get_learned_conditioning(labels))
    assert torch.equal(ours[:, 0], tiny[0].state_dict()["cond_stage_model.embedding.weight"][labels])


def test_scheduler_is_ldms_ddim(converted, tiny):
    """ldm/models/diffusion/ddim.py: timesteps range(0, 1000, 1000 // S) + 1, betas of
    the 'linear' (sqrt-linear) schedule, last step to alphas_cumprod[0]."""
    sched, original = converted["scheduler"], tiny[0]
    torch.testing.assert_close(sched.betas, original.betas, rtol=1e-5, atol=0)
    torch.testing.assert_close(sched.alphas_cumprod, original.alphas_cumprod, rtol=1e-4, atol=0)
    sched.set_timesteps(250)
    assert sched.timesteps.tolist() == (np.arange(0, 1000, 4) + 1)[::-1].tolist()
    assert sched.final_alpha_cumprod == sched.alphas_cumprod[0]
    assert not sched.config.clip_sample and sched.config.prediction_type == "epsilon"


@pytest.mark.integration
def test_real_yaml_gives_the_shipped_architecture_and_table1_macs():
    """cin256-v2.yaml (CompVis/latent-diffusion) -> the config in bench/archs/ldm_cin256,
    400.9 M parameters, and main Table 1's MACs (DDIM-250, branch 1) within 0.5 %."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    configs = convert.ldm_configs(yaml.safe_load(lo.REAL_CONFIG.read_text()), "cin256-v2.yaml")
    shipped = ROOT / "bench" / "archs" / "ldm_cin256"

    def public(config):
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    unet = convert._meta_model(UNet2DConditionModel, configs.unet)
    expected = convert._meta_model(UNet2DConditionModel, json.loads((shipped / "unet" / "config.json").read_text()))
    assert public(unet.config) == public(expected.config)
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(400.9, abs=0.05)
    sched = DDIMScheduler.from_config(json.loads((shipped / "scheduler" / "scheduler_config.json").read_text()))
    assert public(DDIMScheduler.from_config(configs.scheduler).config) == public(sched.config)
    assert configs.vqvae["num_vq_embeddings"] == 8192 and configs.vqvae["vq_embed_dim"] == 3
    assert configs.vqvae["block_out_channels"] == [128, 256, 512] and configs.vqvae["scaling_factor"] == 1.0
    assert configs.class_embedder["num_embeddings"] == 1001 and configs.class_embedder["embedding_dim"] == 512

    mcfg = compose_cfg("model=ldm_cin256").model
    m = measure.call_macs(LoadedModel(unet, {}, "meta"), model_spec(mcfg), apply(CacheSettings(interval=2, branch=1), unet, 2))
    full, retrieval = m["full"], m["retrieval"]
    assert full.paper / 1e9 == pytest.approx(99.82, rel=5e-3)
    table = pd.read_csv(ROOT / "results" / "paper" / "table1_imagenet_ldm4g.csv")
    rows = table[table.schedule == "uniform"]
    assert sorted(rows.interval) == [2, 3, 5, 10, 20]
    for _, row in rows.iterrows():
        avg = macs.average_macs(full, retrieval, uniform_full_calls(250, int(row.interval)), 250).paper / 1e9
        assert avg == pytest.approx(row.macs_g, rel=5e-3), row.interval


class FromAnotherLibrary:
    """A stand-in for what a Lightning checkpoint pickles besides tensors."""

    def __init__(self):
        self.best_score = torch.tensor(0.5)


@pytest.mark.integration
def test_pickled_objects_besides_tensors_and_safetensors_input(tmp_path, tiny, converted):
    from safetensors.torch import save_file

    state = tiny[0].state_dict()
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "callbacks": {FromAnotherLibrary: {"k": 1}}, "cb": FromAnotherLibrary(),
                "hparams": argparse.Namespace(lr=1e-4)}, ckpt)
    with pytest.raises(Exception):
        torch.load(ckpt, weights_only=True)
    loaded = convert.load_checkpoint(ckpt)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    assert convert.main(["ldm", str(st), str(tiny[2]), str(tmp_path / "from_st")]) == 0
    from diffusers import UNet2DConditionModel

    again = UNet2DConditionModel.from_pretrained(tmp_path / "from_st", subfolder="unet")
    for k, v in converted["unet"].state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def _edited(tmp_path, tiny, edit) -> Path:
    state = dict(tiny[0].state_dict())
    edit(state)
    path = tmp_path / "edited.ckpt"
    torch.save({"state_dict": state}, path)
    return path


def _assert_one_line_error(err: str, *needles: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda s: s.pop("model.diffusion_model.input_blocks.4.1.proj_in.weight"),
         ["no weights for unet/down_blocks.1.attentions.0.proj_in.weight"]),
        (lambda s: s.pop("cond_stage_model.embedding.weight"), ["missing cond_stage_model.embedding.weight"]),
        (lambda s: s.pop("first_stage_model.quantize.embedding.weight"),
         ["missing first_stage_model.quantize.embedding.weight"]),
        (lambda s: s.update({"model.diffusion_model.extra.weight": torch.zeros(2)}),
         ["unexpected model.diffusion_model.extra.weight"]),
        (lambda s: s.update({"model_ema.diffusion_modelout2bias": torch.zeros(3)}),
         ["unexpected model_ema.diffusion_modelout2bias"]),
        (lambda s: s.update({"cond_stage_model.embedding.weight": torch.zeros(1000, 32)}),
         ["wrong shape cond_stage_model.embedding.weight (1000, 32) (the yaml needs (1001, 32))"]),
        (lambda s: s.update({"betas": s["betas"] * 1.1}), ["its betas do not follow the yaml's schedule"]),
    ],
    ids=["unet-key", "class-embedding", "codebook", "extra-key", "ema-weights", "embedding-rows", "betas"],
)
@pytest.mark.integration
def test_mismatched_checkpoint_is_one_line(tmp_path, tiny, capsys, edit, needles):
    ckpt = _edited(tmp_path, tiny, edit)
    assert convert.main(["ldm", str(ckpt), str(tiny[2]), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err, "edited.ckpt does not match cin256-v2-tiny.yaml", *needles)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.integration
def test_bad_input_from_the_command_line_exits_2_without_traceback(tmp_path, tiny):
    """The same one-line errors as above, from the command a user runs (an occupied
    output directory is refused before the checkpoint is read)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    r = run_convert(tiny[1], tiny[2], tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    _assert_one_line_error(r.stderr, "exists and is not an empty directory")


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(attn_resolutions=[32]),
         ["model.params.first_stage_config.params.ddconfig.attn_resolutions=[32] is not supported"]),
        (lambda p: p.update(conditioning_key="concat"), ["model.params.conditioning_key='concat'"]),
        (lambda p: p["cond_stage_config"]["params"].update(n_classes=7), ["n_classes=7"]),
        (lambda p: p.pop("unet_config"), ["no model.params.unet_config"]),
    ],
    ids=["vq-attention", "conditioning", "classes", "no-unet"],
)
def test_unsupported_yaml_names_the_setting(tmp_path, tiny, capsys, edit, needles):
    config = yaml.safe_load(tiny[2].read_text())
    edit(config["model"]["params"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert convert.main(["ldm", str(tiny[1]), str(bad), str(tmp_path / "out")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "bad.yaml: ", *needles)


def test_outputs_are_atomic(tmp_path, tiny, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert convert.main(["ldm", str(tiny[1]), str(tiny[2]), str(taken)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "exists and is not an empty directory")
    assert (taken / "keep.txt").read_text() == "x"

    import safetensors.torch

    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert convert.main(["ldm", str(tiny[1]), str(tiny[2]), str(tmp_path / "out")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "cannot write the converted model (No space left on device)")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_unreadable_inputs_are_one_line(tmp_path, tiny, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    for args, needle in (
        ([tmp_path / "nope.ckpt", tiny[2]], "no such file"),
        ([junk, tiny[2]], "cannot read it"),
        ([tiny[1], tmp_path / "nope.yaml"], "no such file"),
    ):
        assert convert.main(["ldm", *map(str, args), str(tmp_path / "out")]) == 2
        _assert_one_line_error(capsys.readouterr().err, needle)
