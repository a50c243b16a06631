"""The command line, run as a user runs it: records, sweeps, and every bad input refused in one line."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest

from harness import run_py

COST = ["run.mode=cost", "model=ddpm_cifar10", "model.weights=random", "sampler=ddim"]
FAST = ["sampler.steps=10", "run.timing=off", "run.progress=false"]


def run_cost(*overrides, tmp_path):
    return run_py(*overrides, f"hydra.run.dir={tmp_path}/out")


@pytest.mark.integration
def test_cost_run_writes_the_schedule(tmp_path):
    r = run_cost(*COST, "sampler.steps=100", "cache.interval=5", "cache.branch=1", "run.timing=off", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    record_path = tmp_path / "out" / "run.json"
    assert f"run record: {record_path}" in r.stdout
    rec = json.loads(record_path.read_text())
    assert rec["status"] == "ok" and rec["record_version"] == 2
    assert rec["full_calls"] == list(range(0, 100, 5))
    assert rec["num_model_calls"] == 100
    assert rec["cache"]["branch"] == 1 and rec["cache"]["skip_producer"] == "conv_in"
    assert rec["settings"]["sampler"]["steps"] == 100
    assert rec["wall_time_s"] > 0
    assert rec["environment"]["torch"]
    # the summary line: MACs in G per call
    assert "uniform N=5 branch 1 | MACs 1.606 G/call" in r.stdout


def _bad(r, expect: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "override,expect",
    [
        ("cache.interval=0", "cache.interval must be an integer >= 1, got 0"),
        ("cache.branch=13", "valid branches are 1..12"),
        ("sampler.steps=0", "sampler.steps=0 must be between 1 and 1000"),
        ("run.threads=-1", "run.threads=-1 must be >= 1"),
        ("run.timing_repeats=0", "run.timing_repeats=0 must be >= 2"),
        ("run.timing_precision=0", "run.timing_precision=0.0 must be > 0"),
        ("+foo=1", "unknown setting 'foo'; valid settings: model, sampler, cache, run, metrics, quality"),
        ("+run.speed=2", "unknown setting 'run.speed'; valid settings of run: mode, seed, num_samples"),
        ("run.device=cuda:7", "run.device='cuda:7' but CUDA is not available"),
    ],
)
@pytest.mark.integration
def test_bad_input_is_one_line(tmp_path, override, expect):
    r = run_cost(*COST, *FAST, override, tmp_path=tmp_path)
    _bad(r, expect)
    assert len(r.stderr.strip().splitlines()) == 1
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["status"] == "failed" and expect in rec["error"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "override,expect",
    [
        ("cache.schedule=sometimes", "expected one of [uniform, nonuniform, none]"),
        ("run.dtype=int8", "expected one of [float32, float16, bfloat16]"),
        ("model=no_such_model", "Could not find 'model/no_such_model'; valid values in 'model': bk_sdm_base, "
                                "bk_sdm_small, bk_sdm_tiny, ddpm_bedroom, ddpm_church, ddpm_cifar10, digits, "
                                "ldm_cin256, sd15"),
        ("cache.no_such_key=1", "Key 'no_such_key' not in 'CacheConfig'; valid settings of cache: interval, branch, "
                                "schedule, center, power, ablation"),
        ("cache.interval=[", "cannot parse the override 'cache.interval=[': no viable alternative at input '['"),
    ],
)
def test_composition_errors_name_the_key_and_the_valid_values(tmp_path, override, expect):
    """Hydra's own composition messages, in one line, exit 2 like the harness's refusals,
    no traceback, nothing run."""
    r = run_cost(*COST, *FAST, override, tmp_path=tmp_path)
    _bad(r, expect)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.integration
def test_hydra_options_still_work_and_composition_errors_in_a_sweep_exit_2(tmp_path):
    r = run_py("--cfg", "job", "cache.interval=3")
    assert r.returncode == 0 and "interval: 3" in r.stdout, r.stderr
    r = run_py("-m", *COST, *FAST, "model=ddpm_cifar10,nosuch", f"hydra.sweep.dir={tmp_path}/sweep")
    _bad(r, "Could not find 'model/nosuch'; valid values in 'model'")
    assert not list(tmp_path.glob("sweep/*/run.json"))


@pytest.mark.integration
@pytest.mark.parametrize("override,expect", [
    ("cache.power=nan", "cache.power=nan must be a finite number > 1"),
    ("sampler.steps=5000", "sampler.steps=5000 must be between 1 and 1000"),  # was diffusers' traceback
])
def test_values_the_schema_lets_through_are_one_line_and_no_bare_nan(tmp_path, override, expect):
    r = run_cost(*COST, *FAST, override, tmp_path=tmp_path)
    _bad(r, expect)
    assert len(r.stderr.strip().splitlines()) == 1
    text = (tmp_path / "out" / "run.json").read_text()
    assert "NaN" not in text and json.loads(text)["status"] == "failed"


@pytest.mark.integration
def test_a_sweep_that_fails_everywhere_runs_nothing(tmp_path):
    """A bad value shared by every point (here one the schema lets through) stops the sweep
    before its first job."""
    r = run_py("-m", *COST, *FAST, "sampler.eta=-1", "cache.interval=2,3", f"hydra.sweep.dir={tmp_path}/sweep")
    _bad(r, "sampler.eta=-1.0 must be in [0, 1]")
    assert r.stderr.strip().splitlines()[-1] == "error: 2 of 2 sweep points are invalid; nothing was run"
    assert not list(tmp_path.glob("sweep/*/run.json"))


@pytest.mark.integration
def test_reference_problems_are_caught_before_generating(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    # the digits model has a reference of its own: a given one is used (so checked), not ignored
    for model, ref, expect in (("digits", corrupt, "is not a readable .npz"),
                               ("ddpm_cifar10", tmp_path / "none.npz", "no such file")):
        r = run_py(f"model={model}", "model.weights=random", *FAST, "run.num_samples=4",
                   f"metrics.reference={ref}", f"run.store_dir={tmp_path}/store", f"hydra.run.dir={tmp_path}/o")
        _bad(r, f"metrics.reference={str(ref)!r}")
        assert expect in r.stderr
    assert not list(tmp_path.glob("store/**/samples_*.npz"))


@pytest.mark.integration
def test_a_reference_folder_without_images_is_refused_before_generating(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "README.txt").write_text("no images here")
    r = run_py("model.weights=random", *FAST, "run.num_samples=4", "quality.is_split_size=4",
               f"metrics.reference={tmp_path}/ref", f"run.store_dir={tmp_path}/store", f"hydra.run.dir={tmp_path}/o")
    _bad(r, f"metrics.reference={str(tmp_path / 'ref')!r} is a folder without images")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()


@pytest.mark.integration
def test_hub_id_offline_says_how_to_pass_a_local_directory(tmp_path):
    r = run_py("model=ddpm_cifar10", *FAST, "run.mode=cost", f"hydra.run.dir={tmp_path}/o")
    _bad(r, "model.pretrained='google/ddpm-cifar10-32' is a Hugging Face hub id that is not in the local cache")
    assert "model.pretrained=/path/to/ddpm-cifar10-32" in r.stderr


@pytest.mark.integration
def test_missing_prompt_file_is_named(tmp_path):
    r = run_py("model=sd15", "model.weights=random", *FAST, "run.mode=generate",
               "run.prompts.source=/nonexistent.txt", f"hydra.run.dir={tmp_path}/o")
    _bad(r, "run.prompts.source='/nonexistent.txt': no such file")


@pytest.mark.integration
def test_a_sweep_with_a_bad_point_runs_nothing(tmp_path):
    r = run_py("-m", *COST, *FAST, "cache.interval=2,0,3", "cache.branch=1,13", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    # every bad point is listed (interval 0 with both branches, branch 13 with every interval), then a total
    assert sum(line.startswith("error: job #") for line in lines) == 4
    assert lines[-1] == "error: 4 of 6 sweep points are invalid; nothing was run"
    assert not list(tmp_path.glob("sweep/*/run.json"))


@pytest.mark.integration
def test_a_job_that_fails_is_a_row_and_the_others_run(tmp_path):
    """A failure only a job can see (here: too few samples for its IS split) is recorded; the
    other jobs still run; the table marks the row; the command exits 1."""
    r = run_py("-m", "run.num_samples=20", "quality.is_split_size=10,40", *FAST, "sampler.steps=4",
               "cache.interval=2", f"run.store_dir={tmp_path}/store", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 1, r.stderr
    assert "error: 1 of 2 jobs failed" in r.stderr and "Traceback" not in r.stderr
    table = pd.read_csv(tmp_path / "sweep" / "table.csv")
    assert list(table["status"]) == ["ok", "ok", "failed"]  # baseline, job 0, job 1
    assert "quality.is_split_size=40" in table["error"].iloc[2]


def test_store_files_follow_the_umask(tmp_path):
    """Image shards are readable by the group of a shared store (not mkstemp's 0600)."""
    from bench.sampling.store import ImageStore

    old = os.umask(0o002)
    try:
        store = ImageStore(tmp_path, {"k": 1})
        path = store.write(0, np.zeros((2, 4, 4, 1), np.uint8))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert stat.S_IMODE((store.dir / "key.json").stat().st_mode) == 0o664


@pytest.mark.integration
def test_table13_sweep_writes_a_table(tmp_path):
    """The Table 13 experiment, shrunk: two branches, ten steps, two timing rounds."""
    r = run_py("-m", "experiment=table13", "sampler.steps=10", "cache.branch=1,3", "run.timing_repeats=2",
               "run.timing_budget_s=0", "run.timing_warmup=0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr
    full = pd.read_csv(tmp_path / "sweep" / "table.csv", dtype={"job": str})
    assert list(full["schedule"]) == ["none", "uniform", "uniform"]  # one shared baseline row
    assert full.loc[0, "macs_g"] == pytest.approx(full.loc[1, "macs_full_g"])
    table = full[full.schedule == "uniform"].reset_index(drop=True)
    assert list(table["branch"]) == [1, 3]
    assert set(table["interval"]) == {5} and set(table["steps"]) == {10}
    for _, row in table.iterrows():
        # uniform 1:5 over 10 calls: calls 0 and 5 full
        expected = (2 * row["macs_full_g"] + 8 * row["macs_retrieval_g"]) / 10
        assert row["macs_g"] == pytest.approx(expected, rel=1e-5)
        assert row["macs_predicted_speedup"] == pytest.approx(row["macs_full_g"] / row["macs_g"], rel=1e-5)
        assert row["speedup"] == pytest.approx(row["throughput"] / row["throughput_baseline"], rel=1e-5)
        assert row["timing_method"] == "calls"
    # branch 1 runs less of the network than branch 3
    assert table.loc[0, "macs_g"] < table.loc[1, "macs_g"]
    # CIFAR-10 full call, paper convention (docs/conventions.md §3: 6.05 G)
    assert table.loc[0, "macs_full_g"] == pytest.approx(6.05, rel=2e-3)
    # rebuilt from the records alone, the table is the same
    from bench.report.table import build_table

    rebuilt = build_table(tmp_path / "sweep")
    pd.testing.assert_frame_equal(rebuilt, full, check_dtype=False, check_exact=False, rtol=1e-5)
