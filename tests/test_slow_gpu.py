"""Tests outside the default run: `pytest -m slow` (minutes) and `pytest -m gpu` (CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.caching.engine import CacheSettings, deepcache
from harness import run_py
from tiny import cifar10_unet


@pytest.mark.slow
def test_default_run_unshrunk(tmp_path):
    """`python run.py` exactly as the README gives it (about a minute on two cores)."""
    r = run_py(f"run.store_dir={tmp_path}/store", f"hydra.run.dir={tmp_path}/out")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["num_samples"] == 256 and rec["cache"]["interval"] == 5
    assert rec["full_calls"] == list(range(0, 100, 5))
    assert rec["baseline"]["fid"] <= rec["fid"]  # caching costs some quality
    assert rec["macs_paper"] < rec["baseline"]["macs_paper"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_engine_is_exact_on_cuda(dtype):
    unet = cifar10_unet().to("cuda", dtype)
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=dtype)
    t = torch.tensor(500)
    with torch.inference_mode():
        ref = unet(x, t).sample
        with deepcache(unet, CacheSettings(interval=1, branch=3)):
            assert torch.equal(unet(x, t).sample, ref)
        with deepcache(unet, CacheSettings(interval=2, branch=3)):
            full, retr = unet(x, t).sample, unet(x, t).sample
    assert torch.equal(full, ref) and torch.equal(retr, full)
