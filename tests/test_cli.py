"""The Hydra entry point, run as a user runs it."""

from __future__ import annotations

import json

import pytest

from harness import run_py
COST = ["run.mode=cost", "model=ddpm_cifar10", "model.weights=random", "sampler=ddim"]


def run_cost(*overrides, tmp_path):
    return run_py(*overrides, f"hydra.run.dir={tmp_path}/out")


def test_cost_run_writes_the_schedule(tmp_path):
    r = run_cost(*COST, "sampler.steps=100", "cache.interval=5", "cache.branch=1", "run.timing=off", tmp_path=tmp_path)
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
    r = run_cost(*COST, "sampler.steps=10", "run.timing=off", override, tmp_path=tmp_path)
    assert r.returncode != 0
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "run.json").exists()


def test_table13_sweep_writes_a_table(tmp_path):
    """The Table 13 experiment, shrunk: two branches, ten steps, one timing repeat."""
    import pandas as pd

    r = run_py("-m", "experiment=table13", "sampler.steps=10", "cache.branch=1,3", "run.timing_repeats=1",
               "run.timing_warmup=0", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "sweep" / "table.csv", dtype={"job": str})
    assert list(table["branch"]) == [1, 3]
    assert set(table["interval"]) == {5} and set(table["steps"]) == {10}
    for _, row in table.iterrows():
        # uniform 1:5 over 10 calls: calls 0 and 5 full
        expected = (2 * row["macs_full_paper"] + 8 * row["macs_retrieval_paper"]) / 10
        assert row["macs_paper"] == pytest.approx(expected)
        assert row["macs_predicted_speedup"] == pytest.approx(row["macs_full_paper"] / row["macs_paper"])
        assert row["speedup"] == pytest.approx(row["throughput"] / row["throughput_baseline"])
        assert row["timing_method"] == "calls"
    # branch 1 runs less of the network than branch 3
    assert table.loc[0, "macs_paper"] < table.loc[1, "macs_paper"]
    # CIFAR-10 full call, paper convention (FACTS.md section 3: 6.05 G)
    assert table.loc[0, "macs_full_paper"] == pytest.approx(6.05e9, rel=2e-3)
    # rebuilt from the records alone, the table is the same
    from bench.report import build_table

    rebuilt = build_table(tmp_path / "sweep")
    pd.testing.assert_frame_equal(rebuilt, table, check_dtype=False, check_exact=False, rtol=1e-12)
