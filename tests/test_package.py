"""The harness as an installed package: the wheel holds everything a run needs, and the
command works from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from harness import ROOT

COST = ["model=ddpm_cifar10", "model.weights=random", "run.mode=cost", "run.timing=off", "sampler.steps=10"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    path = next(out.glob("deepcache_bench-*.whl"))
    site = out / "site"
    with zipfile.ZipFile(path) as z:
        z.extractall(site)
        names = set(z.namelist())
    return site, names


@pytest.mark.integration
def test_the_wheel_holds_configs_architectures_assets_and_the_sweeper(wheel):
    _, names = wheel
    for model in ("ddpm_cifar10", "ddpm_church", "ddpm_bedroom", "ldm_cin256", "sd15"):
        assert f"bench/archs/{model}/unet/config.json" in names
        assert f"bench/archs/{model}/scheduler/scheduler_config.json" in names
        assert f"bench/conf/model/{model}.yaml" in names
    for f in ("bench/conf/config.yaml", "bench/conf/quality/adm_digits.yaml", "bench/conf/experiment/table13.yaml",
              "bench/conf/hydra/launcher/slurm.yaml", "bench/conf/hydra/launcher/local.yaml",
              "bench/conf/hydra/sweeper/search.yaml", "hydra_plugins/deepcache_bench/search_sweeper.py",
              "bench/assets/digits/unet/diffusion_pytorch_model.safetensors",
              "bench/assets/digits/classifier/model.safetensors",
              "hydra_plugins/deepcache_bench/table_sweeper.py", "metrics/evaluate.py"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "benchmarks/", "scripts/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(next(wheel[0].parent.glob("*.whl"))) as z:
        assert "deepcache-bench = bench.cli:main" in z.read(entry_points).decode()


def _from_wheel(site, tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    code = "import bench, sys; print('bench from', bench.__file__); from bench.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, env=env)


@pytest.mark.integration
def test_a_run_and_a_sweep_from_the_wheel_outside_the_checkout(wheel, tmp_path):
    site, _ = wheel
    r = _from_wheel(site, tmp_path, *COST, "hydra.run.dir=out")
    assert r.returncode == 0, r.stderr
    assert f"bench from {site}" in r.stdout
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "ok"
    r = _from_wheel(site, tmp_path, "-m", *COST, "cache.branch=1,3", "hydra.sweep.dir=sweep")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sweep" / "table.csv").is_file()
    assert "accelerate" not in r.stderr  # no loading noise


@pytest.mark.integration
def test_the_installed_command_works_from_any_directory(tmp_path):
    exe = shutil.which("deepcache-bench")
    if exe is None:
        pytest.skip("deepcache-bench is not installed in this environment (pip install -e .)")
    r = subprocess.run([exe, *COST, "hydra.run.dir=out"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "run.json").read_text())["full_calls"] == [0, 5]
