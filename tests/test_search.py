"""The Optuna search of (c, p, branch) (`hydra/sweeper=search`): a 3-trial search on the digits
model scores each trial by its FID, or +inf below the speed-up floor without generating its
images; the table is written at the end; a bad search space or setting runs nothing."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import yaml

from harness import run_py

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the search extra (hydra-optuna-sweeper)")

# digits, DDIM-10, N = 5: MACs-predicted speed-up 3.04x at branch 1, 1.88x at branch 2; the
# floor 2.5 makes branch 2 infeasible
TINY = ["hydra/sweeper=search", "hydra.sweeper.n_trials=3", "cache.interval=5", "sampler.steps=10",
        "cache.branch=choice(1,2)", "hydra.sweeper.min_speedup=2.5", "run.num_samples=8", "run.batch_size=8",
        "quality.is_split_size=4", "run.timing=off", "run.progress=false", "run.threads=1"]


@pytest.mark.integration
def test_a_three_trial_search_scores_fid_above_the_floor_and_inf_below(tmp_path):
    r = run_py("-m", *TINY, f"run.store_dir={tmp_path}/store", f"metrics.cache_dir={tmp_path}/metrics",
               f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "sweep"
    records = [json.loads((sweep / str(j) / "run.json").read_text()) for j in range(3)]
    feasible = []
    for rec in records:
        s = rec["search"]
        assert s["objective"] == "fid" and s["speedup_kind"] == "macs" and s["min_speedup"] == 2.5
        assert rec["settings"]["cache"]["schedule"] == "nonuniform"
        assert 0 <= rec["settings"]["cache"]["center"] <= 10 and 1.05 <= rec["settings"]["cache"]["power"] <= 1.6
        if rec["cache"]["branch"] == 1:
            assert s["feasible"] and s["speedup"] == pytest.approx(3.0448, rel=1e-4)
            assert rec["mode"] == "full" and s["value"] == rec["measurements"]["fid"]
            feasible.append(rec)
        else:  # below the floor: its cost only, no image generated
            assert not s["feasible"] and s["speedup"] == pytest.approx(1.8794, rel=1e-4)
            assert rec["mode"] == "cost" and s["value"] == math.inf and "fid" not in rec["measurements"]
    assert {rec["cache"]["branch"] for rec in records} == {1, 2}  # TPE's seeded start tries both
    stores = {p.name for p in (tmp_path / "store").iterdir()}
    assert stores == {rec["store"].rsplit("/", 1)[1] for rec in feasible} | {feasible[0]["baseline"]["store"].rsplit("/", 1)[1]}

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    winner = min(feasible, key=lambda rec: rec["search"]["value"])
    assert best["best_value"] == pytest.approx(winner["search"]["value"])
    assert best["best_params"]["cache.branch"] == 1
    assert best["best_params"]["cache.center"] == pytest.approx(winner["cache"]["center"])

    table = pd.read_csv(sweep / "table.csv")
    assert list(table["schedule"]) == ["none", "nonuniform", "nonuniform", "nonuniform"]
    assert set(table["status"]) == {"ok"}
    assert table.loc[table["branch"] == 2, "fid"].isna().all() and table.loc[table["branch"] == 1, "fid"].notna().all()


@pytest.mark.integration
def test_a_search_space_outside_the_settings_runs_nothing(tmp_path):
    """The corners of the space are checked first: here c beyond the 10 model calls."""
    r = run_py("-m", *TINY, "cache.center=interval(0,50)", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "error: 1 of 4 sweep points are invalid; nothing was run"
    assert "cache.center=50.0 must lie in [0, 10] (a model call of the 10 this sampler makes" in lines[-2]
    assert not list(tmp_path.glob("sweep/*/run.json"))


@pytest.mark.integration
def test_a_bad_search_setting_is_one_line_and_runs_nothing(tmp_path):
    r = run_py("-m", *TINY, "hydra.sweeper.speedup=wall", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: hydra.sweeper.speedup='wall' must be one of macs, measured"
    assert not list(tmp_path.glob("sweep/*/run.json"))


@pytest.mark.parametrize(
    "settings,expect",
    [
        (("", 2.0, "macs", "minimize", "off"), "hydra.sweeper.objective='' must name a measurement"),
        (("fid", 2.0, "measured", "minimize", "off"), "hydra.sweeper.speedup=measured needs the run's timing"),
        (("fid", -1, "macs", "minimize", "off"), "hydra.sweeper.min_speedup=-1 must be a number >= 0"),
        (("fid", "2", "macs", "minimize", "off"), "hydra.sweeper.min_speedup='2' must be a number"),
        (("fid", 2.0, "macs", "lower", "off"), "hydra.sweeper.direction='lower' must be minimize or maximize"),
    ],
)
def test_the_search_settings_are_checked(settings, expect):
    from bench.core.errors import HarnessError
    from bench.run.search import check_settings

    with pytest.raises(HarnessError, match=re.escape(expect)):
        check_settings(*settings)
    check_settings("fid", 2.0, "measured", "maximize", "calls")  # a good one passes


def test_the_corners_of_a_search_space():
    from hydra_plugins.deepcache_bench.search_sweeper import corner_jobs

    jobs = corner_jobs({"cache.center": "interval(0, 100)", "cache.branch": "choice(1, 2, 3)",
                        "cache.schedule": "nonuniform"}, ["cache.center=interval(10,20)", "run.seed=3"])
    fixed = ["cache.schedule=nonuniform", "run.seed=3"]
    assert jobs == [
        fixed + ["cache.center=10.0", "cache.branch=1"],
        fixed + ["cache.center=20.0", "cache.branch=1"],
        fixed + ["cache.center=10.0", "cache.branch=2"],
        fixed + ["cache.center=10.0", "cache.branch=3"],
    ]
