"""The sampling runner on the embedded digits model: determinism, resume, tables, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pandas as pd
import pytest

from bench.sampling import generate
from bench.models import loading as models
from bench.models.pipelines import Pixels
from bench.run.runner import run
from bench.sampling.store import ImageStore
from harness import ROOT, compose_cfg, run_py
from bench.caching.method import apply
from bench.run.parts import cache_settings, model_spec, sampler_spec
from bench.sampling.generate import GenerationSpec

FAST = ["sampler.steps=10", "run.progress=false", "run.timing=off"]


@pytest.fixture(scope="module")
def digits():
    cfg = compose_cfg(*FAST)
    return cfg, models.load_model(model_spec(cfg.model))


def _images(loaded, cfg, settings, indices, batch_size, root):
    store = ImageStore(root, {"test": str(root)})
    gen = GenerationSpec(seed=cfg.run.seed, batch_size=batch_size, progress=False)
    caching = apply(settings, loaded.unet, int(cfg.sampler.steps))
    generate.generate(loaded, sampler_spec(cfg.sampler), caching, store, indices, Pixels(), gen)
    return store.load(indices)


def test_same_seed_same_images_whatever_the_batch_size(digits, tmp_path):
    cfg, loaded = digits
    settings = cache_settings(cfg.cache, cfg.model)
    one = _images(loaded, cfg, settings, range(8), 1, tmp_path / "b1")
    eight = _images(loaded, cfg, settings, range(8), 8, tmp_path / "b8")
    assert one.dtype == np.uint8 and one.shape == (8, 16, 16, 1)
    assert np.array_equal(one, eight)
    # a sample depends on its index only: samples 4..7 alone are the same images
    tail = _images(loaded, cfg, settings, range(4, 8), 3, tmp_path / "tail")
    assert np.array_equal(tail, one[4:])
    assert len({img.tobytes() for img in one}) == 8  # and different samples differ


def test_same_images_for_one_or_two_shards(tmp_path):
    common = [*FAST, "run.mode=generate", "run.num_samples=6", "run.batch_size=4"]
    whole = run(compose_cfg(*common, f"run.store_dir={tmp_path}/s1"), tmp_path / "o1")
    for shard in (0, 1):
        run(compose_cfg(*common, "run.shards=2", f"run.shard={shard}", f"run.store_dir={tmp_path}/s2"),
            tmp_path / f"o2_{shard}")
    rec = json.loads(whole.read_text())
    a = ImageStore.existing(rec["store"])
    # same settings -> same store key, whatever the split
    b = ImageStore.existing(tmp_path / "s2" / Path(rec["store"]).name)
    assert np.array_equal(a.load(range(6)), b.load(range(6)))
    parts = [json.loads((tmp_path / f"o2_{s}" / "run.json").read_text())["sample_indices"] for s in (0, 1)]
    assert parts == [[0, 3], [3, 6]]


@pytest.mark.integration
def test_kill_and_resume_generates_no_sample_twice(tmp_path):
    args = ["run.mode=generate", "sampler.steps=50", "run.num_samples=24", "run.batch_size=2",
            "cache.interval=1", "run.progress=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "run.py", *args, f"run.store_dir={store}", f"hydra.run.dir={tmp_path}/killed"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and len(list(store.glob("*/samples_*.npz"))) < 2:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = sum(int(p.name[16:23]) - int(p.name[8:15]) for p in store.glob("*/samples_*.npz"))
    assert 0 < done_before < 24, "the run was not interrupted midway"
    resumed = json.loads(run(compose_cfg(*args, f"run.store_dir={store}"), tmp_path / "resumed").read_text())
    assert resumed["generation"]["reused"] == done_before
    assert resumed["generation"]["generated"] == 24 - done_before
    fresh = json.loads(run(compose_cfg(*args, f"run.store_dir={tmp_path}/fresh"), tmp_path / "fresh").read_text())
    assert fresh["generation"]["generated"] == 24
    s1, s2 = ImageStore.existing(resumed["store"]), ImageStore.existing(fresh["store"])
    assert np.array_equal(s1.load(range(24)), s2.load(range(24)))
    # a rerun now finds everything on disk
    again = json.loads(run(compose_cfg(*args, f"run.store_dir={store}"), tmp_path / "again").read_text())
    assert again["generation"]["generated"] == 0


@pytest.mark.integration
def test_default_sweep_writes_a_table_with_the_baseline(tmp_path):
    """`python run.py -m cache.interval=...` on the embedded default, shrunk for test time."""
    r = run_py(
        "-m", "cache.interval=5,20", "sampler.steps=20", "run.num_samples=64", "run.batch_size=32",
        "quality.is_split_size=32", "run.timing=calls", "run.timing_repeats=2", "run.timing_budget_s=0",
        "run.timing_warmup=0", "run.progress=false", f"run.store_dir={tmp_path}/store",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "sweep" / "table.csv")
    assert list(table["interval"]) == [1, 5, 20]
    assert list(table["schedule"]) == ["none", "uniform", "uniform"]
    for col in ["branch", "macs_g", "macs_all_g", "throughput", "speedup", "speedup_pm", "timing_reliable", "fid",
                "is_mean", "precision", "recall", "protocol", "num_samples", "steps", "status"]:
        assert col in table.columns, col
    assert set(table["protocol"]) == {"adm/digits-cnn"}
    assert set(table["num_samples"]) == {64} and set(table["status"]) == {"ok"}
    base, n5, n20 = (table.iloc[i] for i in range(3))
    assert base["speedup"] == 1.0 and base["macs_g"] == n5["macs_full_g"]
    assert base["macs_g"] > n5["macs_g"] > n20["macs_g"]
    assert n5["speedup_low"] <= n5["speedup"] <= n5["speedup_high"]
    # the sweep prints its rows
    assert "uniform N=5 branch 1 | speed-up" in r.stdout and "table: " in r.stdout
    # quality falls as N grows: the baseline is at least as good as N = 20
    assert base["fid"] <= n20["fid"]
    assert base["precision"] >= n20["precision"] or base["recall"] >= n20["recall"]
    # both cached jobs share one baseline (generated once)
    assert len(list((tmp_path / "store").iterdir())) == 3


REGRESSION = Path(__file__).parent / "data" / "regression_digits.json"
REGRESSION_ARGS = [
    "sampler.steps=10", "run.num_samples=32", "run.batch_size=16", "cache.interval=3", "cache.branch=2",
    "quality.is_split_size=16", "run.timing=off", "run.progress=false",
]
REGRESSION_KEYS = ["fid", "is_mean", "precision", "recall", "macs_g", "macs_all_g"]


def regression_values(tmp_path) -> dict:
    rec = json.loads(run(compose_cfg(*REGRESSION_ARGS, f"run.store_dir={tmp_path}"), tmp_path / "o").read_text())
    m, b = rec["measurements"], rec["baseline"]["measurements"]
    out = {k: m[k] for k in REGRESSION_KEYS}
    out.update({f"baseline_{k}": b[k] for k in ("fid", "is_mean", "precision", "recall")})
    out["full_calls"] = rec["full_calls"]
    return out


@pytest.mark.integration
def test_regression_on_a_fixed_subset(tmp_path):
    """Pinned values (tests/data/regression_digits.json, written by
    `python tests/test_runner.py --update-regression`): a change of the engine, the
    runner or the metrics that changes results fails here. The tolerance absorbs
    float32 differences between CPUs (different SIMD kernels move FID by ~1e-5
    relative); any real change moves it far more."""
    expected = json.loads(REGRESSION.read_text())
    got = regression_values(tmp_path)
    assert got["full_calls"] == expected["full_calls"]
    for k, v in expected.items():
        if k != "full_calls":
            assert got[k] == pytest.approx(v, rel=2e-4, abs=1e-9), k


@pytest.mark.integration
def test_full_run_scores_run_and_baseline_paired(tmp_path):
    """run.mode=full: each quality number with its interval, the cached run's difference to its baseline
    with the paired interval; the table carries them, each after its metric."""
    from bench.report.table import build_table

    cfg = compose_cfg(*REGRESSION_ARGS, "quality.resamples=20", f"run.store_dir={tmp_path}/store")
    rec = json.loads(run(cfg, tmp_path / "sweep" / "0").read_text())
    m, b = rec["measurements"], rec["baseline"]["measurements"]
    for key in ("fid", "is_mean", "precision", "recall"):
        assert m[f"{key}_delta"] == pytest.approx(m[key] - b[key]), key
        assert m[f"{key}_delta_low"] <= m[f"{key}_delta"] <= m[f"{key}_delta_high"], key
        assert b[f"{key}_low"] <= b[key] <= b[f"{key}_high"] and f"{key}_delta" not in b, key
    assert m["quality_interval"] == b["quality_interval"] == "bootstrap-normal-95"
    assert m["quality_resamples"] == 20
    table = build_table(tmp_path / "sweep")
    cols = list(table.columns)
    assert cols[cols.index("fid"):cols.index("fid") + 6] == [
        "fid", "fid_low", "fid_high", "fid_delta", "fid_delta_low", "fid_delta_high"]
    assert np.isnan(table.loc[0, "fid_delta"]) and table.loc[1, "fid_delta"] == pytest.approx(m["fid_delta"])


@pytest.mark.parametrize(
    "args,expect",
    [
        (["model.pretrained=/nonexistent/weights"], "model.pretrained='/nonexistent/weights': no such directory"),
        (["sampler=no_such_sampler"], "Could not find 'sampler/no_such_sampler'"),
        (["run.mode=generate", "run.num_samples=2", "run.shards=3"], "run.shards=3 must be between 1 and run.num_samples=2"),
        (["run.mode=generate", "run.store_dir={tmp}/a_file/store"], "run.store_dir="),
        (["hydra.run.dir={tmp}/a_file/out"], "cannot be created"),
    ],
)
@pytest.mark.integration
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, expect):
    """One line, exit != 0, no image; the run's folder holds a record saying it failed (or, when
    the folder itself cannot be made, nothing)."""
    (tmp_path / "a_file").write_text("not a directory")
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith("hydra.run.dir") for a in args):
        args.append(f"hydra.run.dir={tmp_path}/out")
    r = run_py(*FAST, "run.num_samples=4", f"run.store_dir={tmp_path}/store", *args)
    assert r.returncode != 0
    assert expect in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("**/samples_*.npz"))
    for path in tmp_path.glob("**/run.json"):
        rec = json.loads(path.read_text())
        assert rec["status"] == "failed" and expect in rec["error"] and "measurements" not in rec


@pytest.mark.integration
def test_corrupt_weights_are_a_clear_error(tmp_path):
    bad = tmp_path / "digits"
    shutil.copytree(ROOT / "bench" / "assets" / "digits", bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    r = run_py(*FAST, f"model.pretrained={bad}", f"hydra.run.dir={tmp_path}/out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model.pretrained=") and "cannot load UNet2DModel" in lines[-1]
    assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"


if __name__ == "__main__" and "--update-regression" in sys.argv:
    import tempfile

    values = regression_values(Path(tempfile.mkdtemp()))
    REGRESSION.write_text(json.dumps(values, indent=2) + "\n")
    print(json.dumps(values, indent=2))


@pytest.mark.integration
def test_inception_protocol_end_to_end_on_cifar10_architecture(tmp_path):
    """model=ddpm_cifar10 (random weights) through the ADM/Inception path: random
    Inception weights saved by the test and a tiny ADM-style reference batch. The cached
    images only (each FID or sFID is a 2048 x 2048 matrix square root, ~17 s here)."""
    from metrics.inception import save_random_inception_weights

    weights = save_random_inception_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8))
    cfg = compose_cfg(
        "model=ddpm_cifar10", "model.weights=random", "sampler.steps=2", "run.num_samples=4",
        "run.batch_size=4", "cache.interval=2", "quality.is_split_size=2", "run.timing=off",
        "run.baseline_images=false",
        "run.progress=false", f"metrics.reference={ref}", f"metrics.inception_weights={weights}",
        f"metrics.cache_dir={tmp_path}/mcache", f"run.store_dir={tmp_path}/store",
    )
    rec = json.loads(run(cfg, tmp_path / "out").read_text())
    m, b = rec["measurements"], rec["baseline"]["measurements"]
    assert m["protocol"] == "adm/inception-v3-compat"
    for key in ("fid", "sfid", "is_mean", "precision", "recall"):
        assert np.isfinite(m[key]), key
    assert "fid" not in b and b["macs_g"] == m["macs_full_g"]  # the baseline's cost, not its images
    assert m["n_fake"] == 4 and m["macs_full_g"] == pytest.approx(6.05, rel=2e-3)


def test_hub_layout_checkpoint_loads_through_from_pretrained(tmp_path):
    """A DDPM hub repository keeps the U-Net and scheduler config at its root
    (google/ddpm-cifar10-32); model=ddpm_cifar10 loads such a local directory."""
    from diffusers import DDPMScheduler

    from tiny import tiny_unet2d

    unet = tiny_unet2d()
    unet.save_pretrained(tmp_path / "ckpt")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "ckpt")
    cfg = compose_cfg("model=ddpm_cifar10", f"model.pretrained={tmp_path}/ckpt", "run.mode=cost",
                      "run.timing=off", "sampler.steps=10", "cache.interval=5")
    rec = json.loads(run(cfg, tmp_path / "out").read_text())
    assert rec["model_source"] == f"{tmp_path}/ckpt"
    loaded = models.load_model(model_spec(cfg.model))
    other = models.load_model(model_spec(compose_cfg("model=ddpm_cifar10", "model.weights=random").model))
    assert loaded.fingerprint != other.fingerprint
    for k, v in unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v)
    assert rec["full_calls"] == [0, 5] and rec["cache"]["branch"] == 3


def test_too_few_samples_for_the_is_split_fails_before_generating(tmp_path):
    cfg = compose_cfg(*FAST, "run.num_samples=8", f"run.store_dir={tmp_path}/store")
    from bench.core.errors import HarnessError

    with pytest.raises(HarnessError, match=r"run.num_samples=8 .*quality.is_split_size=100"):
        run(cfg, tmp_path / "out")
    assert not list(tmp_path.glob("**/samples_*.npz"))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"
