"""Sweeps through Hydra's submitit launcher (the SLURM path), run here by submitit's local
executor: shards as parallel jobs give the images of one process, a second sweep measures
over the merged store without regenerating, a failed job is a failed row, and a job that
ends without a result (killed) is a failed row that a rerun completes."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.run.runner import run
from bench.sampling.store import ImageStore
from harness import ROOT, compose_cfg, run_py

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra (hydra-submitit-launcher)")

# one thread per job: two jobs at once on two cores
SMALL = ["sampler.steps=10", "run.num_samples=8", "run.batch_size=3", "run.timing=off", "run.progress=false",
         "run.threads=1"]


def _records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/run.json")}


def test_hydra_finds_the_submitit_launcher_beside_the_harness_sweeper():
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher
    from hydra.plugins.sweeper import Sweeper

    from bench.cli import register

    register()
    launchers = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    sweepers = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in launchers
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher" in launchers
    assert "hydra_plugins.deepcache_bench.table_sweeper.TableSweeper" in sweepers
    assert "hydra_plugins.deepcache_bench.search_sweeper.SearchSweeper" in sweepers
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        assert "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper" in sweepers


@pytest.mark.parametrize("name,target", [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_the_launcher_configs_extend_the_plugin(name, target):
    from hydra import compose, initialize_config_dir

    from bench.cli import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert launcher.gpus_per_node == (1 if name == "slurm" else 0)  # never left to submitit's default
    assert launcher.timeout_min >= 60 and launcher.submitit_folder.endswith(".submitit/%j")
    if name == "slurm":
        assert launcher.array_parallelism == 64 and "partition" in launcher and "signal_delay_s" in launcher


@pytest.mark.integration
def test_the_slurm_launcher_submits_one_array_of_one_gpu_jobs(tmp_path):
    """hydra/launcher=slurm as far as sbatch, with stand-ins for sbatch and srun that record the
    batch script: one array over the sweep's points, one GPU and the time limit per job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_SCRIPT"\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "script.sh"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SBATCH_SCRIPT": str(script)}
    proc = subprocess.Popen(
        [sys.executable, "run.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "run.mode=generate",
         "run.shards=3", "run.shard=range(3)", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not script.exists():
            time.sleep(0.2)
    finally:  # the sweep would now wait for jobs that never run
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert script.exists(), proc.stderr.read()[-3000:]
    lines = set(script.read_text().splitlines())
    for expect in ("#SBATCH --array=0-2%3", "#SBATCH --gpus-per-node=1", "#SBATCH --time=240", "#SBATCH --partition=gpu",
                   "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --job-name=deepcache-bench",
                   "#SBATCH --signal=USR2@120"):
        assert expect in lines, expect


def test_a_missing_plugin_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    from bench import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_") else real(name, *a))
    assert cli.missing_plugin(["-m", "hydra/launcher=slurm"]) == (
        'error: hydra/launcher=slurm needs the hydra-submitit-launcher plugin: pip install -e ".[slurm]" '
        '(or pip install "deepcache-bench[slurm]")')
    assert "pip install -e \".[search]\"" in cli.missing_plugin(["-m", "hydra/sweeper=search"])
    assert cli.missing_plugin(["-m", "cache.interval=2,3"]) is None


def _one_process(tmp_path: Path, *overrides: str) -> dict:
    """The run in this process (its thread count restored after)."""
    threads = torch.get_num_threads()
    try:
        return json.loads(run(compose_cfg(*SMALL, *overrides), tmp_path / "one").read_text())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
def test_shards_as_parallel_jobs_store_the_images_of_one_process(tmp_path):
    """Two shards as two submitit jobs, as SLURM array jobs would run them."""
    r = run_py("-m", "hydra/launcher=local", "run.mode=generate", "run.shards=2", "run.shard=0,1", *SMALL,
               f"run.store_dir={tmp_path}/store", f"hydra.sweep.dir={tmp_path}/gen")
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "gen" / ".submitit").glob("*/*_result.pkl"))  # the jobs ran through submitit
    gen = _records(tmp_path / "gen")
    assert sorted(gen) == ["0", "1"] and {g["status"] for g in gen.values()} == {"ok"}
    assert [gen[j]["sample_indices"] for j in ("0", "1")] == [[0, 4], [4, 8]]
    assert pd.read_csv(tmp_path / "gen" / "table.csv")["status"].eq("ok").all()

    one = _one_process(tmp_path, "run.mode=generate", f"run.store_dir={tmp_path}/one_store")
    for mine, theirs in ((one["store"], gen["0"]["store"]), (one["baseline"]["store"], gen["0"]["baseline"]["store"])):
        assert Path(mine).name == Path(theirs).name
        assert np.array_equal(ImageStore.existing(mine).load(range(8)), ImageStore.existing(theirs).load(range(8)))


@pytest.mark.integration
def test_metrics_over_a_merged_store_regenerate_nothing_and_a_failed_job_is_a_failed_row(tmp_path):
    """The full mode over a store that holds every image (as the shard jobs leave it): of its
    two submitit jobs, one measures without generating; the other fails (an IS split larger
    than the run), comes back FAILED, is a failed row, and the command exits 1."""
    store = f"run.store_dir={tmp_path}/store"
    _one_process(tmp_path, "run.mode=generate", store)
    r = run_py("-m", "hydra/launcher=local", "run.mode=full", "quality.is_split_size=4,40", *SMALL, store,
               f"metrics.cache_dir={tmp_path}/metrics", f"hydra.sweep.dir={tmp_path}/full")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: 1 of 2 jobs failed" in r.stderr and "Traceback" not in r.stderr
    assert list((tmp_path / "full" / ".submitit").glob("*/*_result.pkl"))
    full = _records(tmp_path / "full")
    assert full["0"]["status"] == "ok" and full["1"]["status"] == "failed"
    assert "quality.is_split_size=40" in full["1"]["error"]
    for g in (full["0"]["generation"], full["0"]["baseline"]["generation"]):
        assert g["generated"] == 0 and g["reused"] == 8  # the store had every image
    table = pd.read_csv(tmp_path / "full" / "table.csv")
    assert list(table["status"]) == ["ok", "ok", "failed"]  # baseline, job 0, job 1
    assert np.isfinite(table.loc[1, "fid"])


def _job_processes(folder: str) -> list[int]:
    """Process ids of submitit tasks started for ``folder`` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in args and any(folder.encode() in a for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the job's process in /proc")
def test_a_killed_job_is_a_failed_row_and_a_rerun_completes_it(tmp_path):
    """A job killed mid-run (as SLURM kills one at its time limit) leaves no result: the
    launcher raises, the sweep still writes the table with the job's row failed, and exits 1.
    Rerunning the same sweep generates only the samples the killed job had not stored."""
    args = ["-m", "hydra/launcher=local", "run.mode=generate", "sampler.steps=30", "run.num_samples=12",
            "run.batch_size=2", "cache.interval=1", "run.threads=1", "run.progress=false",
            f"run.store_dir={tmp_path}/store", f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if list((tmp_path / "store").glob("*/samples_*.npz")):
            for pid in _job_processes(str(tmp_path / "sweep")):
                os.kill(pid, signal.SIGKILL)
                killed = True
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=120)
    assert killed, "the job was not interrupted midway"
    assert proc.returncode == 1, err[-3000:]
    assert "error: job #0" in err and "no result (UncompletedJobError" in err and "Traceback" not in err
    rec = json.loads((tmp_path / "sweep" / "0" / "run.json").read_text())
    assert rec["status"] == "failed" and rec["error"].startswith("no result from the launcher (UncompletedJobError")
    assert pd.read_csv(tmp_path / "sweep" / "table.csv")["status"].tolist() == ["failed"]
    done = sum(int(p.name[16:23]) - int(p.name[8:15]) for p in (tmp_path / "store").glob("*/samples_*.npz"))
    assert 0 < done < 12

    r = run_py(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "sweep" / "0" / "run.json").read_text())
    assert rec["status"] == "ok"
    assert rec["generation"]["reused"] == done and rec["generation"]["generated"] == 12 - done
    assert pd.read_csv(tmp_path / "sweep" / "table.csv")["status"].tolist() == ["ok"]


@pytest.mark.integration
def test_without_the_baseline_a_job_generates_only_its_own_setting(tmp_path):
    """run.baseline_images=false: an array of cached jobs does not regenerate the shared
    baseline in every job; the baseline is the job with cache.interval=1, into the same store."""
    common = ["run.mode=generate", *SMALL, "run.num_samples=4", f"run.store_dir={tmp_path}/store",
              "run.baseline_images=false"]
    threads = torch.get_num_threads()
    try:
        cached = json.loads(run(compose_cfg(*common, "cache.interval=5"), tmp_path / "n5").read_text())
        assert len(list((tmp_path / "store").iterdir())) == 1  # the cached images only
        base = json.loads(run(compose_cfg(*common, "cache.interval=1"), tmp_path / "n1").read_text())
        both = json.loads(run(compose_cfg(*common[:-1], "cache.interval=5"), tmp_path / "both").read_text())
    finally:
        torch.set_num_threads(threads)
    assert "store" not in cached["baseline"] and cached["generation"]["generated"] == 4
    assert len(list((tmp_path / "store").iterdir())) == 2
    assert base["store"] == both["baseline"]["store"] and cached["store"] == both["store"]
    assert both["generation"]["reused"] == 4 and both["baseline"]["generation"]["reused"] == 4
