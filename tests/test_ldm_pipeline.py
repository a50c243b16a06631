"""LDM-4-G generation through the runner: class labels, class-embedding context,
classifier-free guidance with the null class, VQ-f4 decoding, store, resume, metrics.

A tiny checkpoint in CompVis/latent-diffusion's layout (``ldm_original.py``) is
converted with ``bench.models.convert`` and run as ``model=ldm_cin256
model.pretrained=<converted>``; its uncached images must equal the original
model's DDIM sampler with guidance (``ldm/models/diffusion/ddim.py``) given the same
initial latents and labels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bench.models import loading as models
from bench.sampling import loop as sampling
from bench.core.errors import HarnessError
from bench.models.convert import main as convert_main
from bench.core.images import to_uint8
from bench.models.pipelines import ClassToImage, check_labels, class_labels
from bench.run.runner import Prepared, run
from bench.sampling.store import ImageStore
from harness import compose_cfg, run_py
from bench.run.parts import input_spec, model_spec, resolve
import ldm_original as lo

STEPS, N = 4, 2




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_run")
    model, ckpt, config = lo.write_tiny_checkpoint(root)
    assert convert_main(["ldm", str(ckpt), str(config), str(root / "ldm")]) == 0
    return root, model


def _cfg_args(root, *extra):
    return ("model=ldm_cin256", f"model.pretrained={root}/ldm", f"run.store_dir={root}/store", *extra)


def _cfg(root, *extra):
    return compose_cfg(*_cfg_args(
        root, "sampler=ddim", f"sampler.steps={STEPS}", f"cache.interval={N}", "run.num_samples=4",
        "run.batch_size=2", "run.timing=off", "run.progress=false", *extra,
    ))


def _rule(**kw):
    return OmegaConf.structured({"mode": "random", "per_class": 50, "list": [], **kw})


@pytest.mark.integration
def test_generation_equals_the_original_ddim_sampler_and_resumes(tiny):
    root, original = tiny
    cfg = _cfg(root, "run.mode=generate")
    rec = json.loads(run(cfg, root / "out").read_text())
    assert rec["full_calls"] == [0, 2] and rec["cache"]["branch"] == 1
    assert rec["generation"]["generated"] == 4 and rec["baseline"]["generation"]["generated"] == 4
    base = ImageStore.existing(rec["baseline"]["store"]).load(range(4))
    cached = ImageStore.existing(rec["store"]).load(range(4))
    assert base.shape == cached.shape == (4, 32, 32, 3) and base.dtype == np.uint8
    assert not np.array_equal(base, cached)

    labels = class_labels(cfg.run.labels, 0, range(4), 1000)
    x_T = sampling.initial_noise(sampling.sample_generators(0, range(4)), (3, 8, 8), "cpu", torch.float32)
    with torch.no_grad():
        z = lo.ddim_sample(original, x_T, torch.tensor(labels), STEPS, scale=1.5, null_class=1000)
        theirs = to_uint8(original.decode_first_stage(z))
    diff = np.abs(base.astype(int) - theirs.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())

    again = json.loads(run(cfg, root / "out2").read_text())  # resumed: nothing new to generate
    assert again["generation"]["generated"] == 0 and again["baseline"]["generation"]["generated"] == 0
    assert again["store"] == rec["store"] and again["baseline"]["store"] == rec["baseline"]["store"]


def test_context_is_the_label_row_and_uncond_the_null_row(tiny):
    root, original = tiny
    cfg = _cfg(root, "run.labels.mode=list", "run.labels.list=[3,999,0,3]")
    pipe = ClassToImage(model_spec(cfg.model), input_spec(cfg.run), "cpu", torch.float32)
    assert pipe.prompts_for(range(1, 3)) == [999, 0]
    cond, uncond = pipe.conditioning(range(4))
    table = original.state_dict()["cond_stage_model.embedding.weight"]
    assert torch.equal(cond["encoder_hidden_states"], table[[3, 999, 0, 3]][:, None])
    assert torch.equal(uncond["encoder_hidden_states"], table[[1000] * 4][:, None])
    no_guidance = ClassToImage(model_spec(compose_cfg(*_cfg_args(root, "model.guidance_scale=1.0")).model), input_spec(cfg.run), "cpu",
                               torch.float32)
    assert no_guidance.conditioning(range(2))[1] is None


def test_labels_depend_only_on_seed_and_index():
    rule = _rule()
    whole = class_labels(rule, 7, range(40), 1000)
    assert whole == class_labels(rule, 7, range(0, 13), 1000) + class_labels(rule, 7, range(13, 40), 1000)
    assert all(0 <= y < 1000 for y in whole) and len(set(whole)) > 30
    assert whole != class_labels(rule, 8, range(40), 1000)
    assert class_labels(_rule(mode="per_class", per_class=3), 0, range(2, 8), 1000) == [0, 1, 1, 1, 2, 2]
    assert class_labels(_rule(mode="list", list=[5, 6, 7]), 0, range(1, 3), 1000) == [6, 7]
    # 50 per class: a class-balanced 50k over ImageNet's 1000 classes
    per_class = class_labels(_rule(mode="per_class", per_class=50), 0, range(50000), 1000)
    assert np.array_equal(np.bincount(per_class), np.full(1000, 50))


@pytest.mark.parametrize(
    "rule,n,expect",
    [
        (dict(mode="per_class", per_class=2), 2001,
         "run.num_samples=2001 exceeds run.labels.per_class=2 x 1000 classes"),
        (dict(mode="per_class", per_class=0), 1, "run.labels.per_class must be >= 1, got 0"),
        (dict(mode="list", list=[1, 2]), 3, "run.num_samples=3 exceeds the 2 labels of run.labels.list"),
        (dict(mode="list", list=[1, 1000]), 2, "run.labels.list holds [1000], outside the classes 0..999"),
    ],
)
def test_bad_labels_are_one_line(rule, n, expect):
    with pytest.raises(HarnessError) as e:
        check_labels(_rule(**rule), n, 1000)
    assert str(e.value) == expect


@pytest.mark.integration
def test_store_key_tracks_labels_and_guidance(tiny):
    root, _ = tiny

    def digest(*extra):
        cfg = _cfg(root, *extra)
        p = Prepared(resolve(cfg))
        pipe = ClassToImage(p.parts.model, p.parts.inputs, "cpu", torch.float32)
        return p.store(p.caching, pipe, baseline=False).dir

    base = digest()
    others = [digest("run.labels.mode=per_class", "run.labels.per_class=1"),
              digest("run.labels.mode=per_class", "run.labels.per_class=2"),
              digest("run.labels.mode=list", "run.labels.list=[1,2,3,4]"),
              digest("run.labels.mode=list", "run.labels.list=[1,2,3,5]"),
              digest("model.guidance_scale=2.0")]
    assert len({base, *others}) == 6
    assert digest("run.labels.per_class=7") == base  # unused in random mode: same images, same store


@pytest.mark.integration
def test_full_run_from_the_command_line_with_inception_metrics(tiny, tmp_path):
    """``python run.py model=ldm_cin256 model.pretrained=<converted>`` in full mode: the
    Inception metrics (random weights, a tiny ADM-style reference batch) of baseline
    and cached images, and the run's cost. FID and sFID are left out here only for
    time (a 2048 x 2048 matrix square root costs ~35 s on a 2-core CPU); their path
    is the same as for the DDPM models (test_runner.py). The images are those of the
    generate-mode test above where it ran first (same store key)."""
    from metrics.inception import save_random_inception_weights

    root, _ = tiny
    weights = save_random_inception_weights(tmp_path / "inception.pth")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))
    r = run_py(*_cfg_args(root, "sampler=ddim", f"sampler.steps={STEPS}", f"cache.interval={N}",
                          "run.num_samples=4", "run.batch_size=4", "run.timing=calls", "run.timing_repeats=2",
                          "run.timing_budget_s=0", "run.timing_warmup=0", "run.progress=false", "run.threads=1",
                          "quality.which=[is,precision,recall]", "quality.is_split_size=2", f"metrics.reference={ref}",
                          f"metrics.inception_weights={weights}", f"metrics.cache_dir={tmp_path}/mcache",
                          f"hydra.run.dir={tmp_path}/out"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    m, b = rec["measurements"], rec["baseline"]["measurements"]
    assert rec["mode"] == "full" and m["protocol"] == "adm/inception-v3-compat" and m["n_fake"] == 4
    for key in ("is_mean", "precision", "recall"):
        assert np.isfinite(m[key]) and np.isfinite(b[key]), key
    assert m["is_mean"] != b["is_mean"]
    assert rec["settings"]["run"]["labels"] == {"mode": "random", "per_class": 50, "list": []}
    assert m["throughput"] > 0 and m["macs_predicted_speedup"] > 1


def test_cost_mode_with_random_weights_needs_no_pipeline(tiny):
    """model.weights=random keeps working in run.mode=cost (no class embedding, no VQ:
    seeded random 1-token contexts), here on the tiny architecture (model.arch) to keep
    it fast; the real one's MACs are checked in test_paper_macs.py, throughput with
    class contexts in the command-line test above."""
    root, _ = tiny
    cfg = compose_cfg("model=ldm_cin256", "model.weights=random", f"model.arch={root}/ldm", "run.mode=cost",
                      "run.timing=off", "sampler.steps=10", "cache.interval=5")
    rec = json.loads(run(cfg, root / "cost").read_text())
    assert rec["model_source"] == "random:0" and rec["full_calls"] == [0, 5]
    assert rec["measurements"]["macs_full_g"] > rec["measurements"]["macs_g"] > 0
    m = model_spec(cfg.model)
    ctx = models.random_context(m.conditioning, m.context_tokens, models.load_model(m).unet, 2, seed=0)
    assert ctx["encoder_hidden_states"].shape == (2, 1, 32)
