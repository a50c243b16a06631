"""The Hydra entry point, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COST = ["run.mode=cost", "model=ddpm_cifar10", "model.weights=random", "sampler=ddim"]


def run_py(*overrides, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        [sys.executable, "run.py", *overrides, f"hydra.run.dir={tmp_path}/out"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )


def test_cost_run_writes_the_schedule(tmp_path):
    r = run_py(*COST, "sampler.steps=100", "cache.interval=5", "cache.branch=1", "run.timing=off", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    record_path = tmp_path / "out" / "run.json"
    assert f"run record: {record_path}" in r.stdout
    rec = json.loads(record_path.read_text())
    assert rec["full_calls"] == list(range(0, 100, 5))
    assert rec["num_model_calls"] == 100
    assert rec["cache"]["branch"] == 1 and rec["cache"]["skip_producer"] == "conv_in"
    assert rec["settings"]["sampler"]["steps"] == 100
    assert rec["wall_time_s"] > 0
    assert rec["environment"]["torch"]


@pytest.mark.parametrize(
    "override,expect",
    [
        ("cache.interval=0", "cache.interval"),
        ("cache.branch=13", "valid branches are 1..12"),
        ("cache.schedule=sometimes", "expected one of [uniform, nonuniform, none]"),
        ("model=no_such_model", "Could not find 'model/no_such_model'"),
        ("cache.no_such_key=1", "Key 'no_such_key' not in 'CacheConfig'"),
        ("sampler.steps=0", "sampler.steps must be >= 1"),
    ],
)
def test_bad_input_is_one_readable_error(tmp_path, override, expect):
    r = run_py(*COST, "sampler.steps=10", "run.timing=off", override, tmp_path=tmp_path)
    assert r.returncode != 0
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "run.json").exists()
