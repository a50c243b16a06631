"""Tables and plots of sweeps over several caching methods (experiment=methods)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.report.paper import _where, pareto_front, render
from bench.report.table import build_table, format_row

DEEPCACHE = {"interval": 5, "branch": 1, "schedule": "uniform", "center": None, "power": None, "ablation": "none",
             "skip_producer": "conv_in", "skip_consumer": "up_blocks.3.resnets.2"}
BASELINE = {"interval": 1, "branch": None, "schedule": "none", "center": None, "power": None, "ablation": "none",
            "skip_producer": None, "skip_consumer": None}
TGATE = {"method": "tgate", "label": "tgate gate_step=10 deepcache_interval=1 deepcache_branch=1", "gate_step": 10,
         "deepcache_interval": 1, "deepcache_branch": 1, "gate_call": 9}
FD = {"method": "faster_diffusion", "label": "faster_diffusion key_calls=0,1,5", "interval": 4, "key_calls": [0, 1, 5]}


def _record(job_dir: Path, cache: dict, measurements: dict, target: str = "bench.caching.engine.CacheSettings"):
    settings = {"model": {"name": "digits", "weights": "pretrained"}, "sampler": {"name": "ddim", "steps": 20},
                "run": {"seed": 0, "num_samples": 8}, "cache": {"_target_": target}}
    rec = {"status": "ok", "settings": settings, "cache": cache, "num_model_calls": 20, "num_samples": 8,
           "measurements": measurements,
           "baseline": {"cache": BASELINE, "steps": 20, "num_model_calls": 20, "measurements": {"macs_g": 1.0}}}
    job_dir.mkdir(parents=True)
    (job_dir / "run.json").write_text(json.dumps(rec))


def test_a_sweep_over_methods_names_each_rows_method_setting_and_knobs(tmp_path):
    _record(tmp_path / "0", DEEPCACHE, {"macs_g": 0.3, "speedup": 2.0, "fid": 5.0})
    _record(tmp_path / "1", TGATE, {"macs_g": 0.6, "speedup": 1.4, "fid": 4.0}, "bench.caching.tgate.TGate")
    _record(tmp_path / "2", FD, {"macs_g": 0.7, "speedup": 1.3, "fid": 4.5}, "bench.caching.faster_diffusion.X")
    df = build_table(tmp_path)
    assert list(df["method"]) == ["none", "deepcache", "tgate", "faster_diffusion"]  # one shared baseline
    assert list(df["setting"]) == ["no cache", "uniform N=5 branch 1", "gate_step=10 deepcache_interval=1 deepcache_branch=1",
                                   "key_calls=0,1,5"]  # the method column names the method
    assert df.loc[2, "gate_step"] == 10 and df.loc[3, "key_calls"] == "0 1 5"
    cols = list(df.columns)  # the methods' knobs are settings: before the seed, not among the measurements
    assert cols.index("setting") < cols.index("gate_step") < cols.index("seed") < cols.index("macs_g")
    assert "label" not in cols and "skip_producer" not in cols and "_target_" not in cols


def test_a_deepcache_sweep_keeps_its_columns(tmp_path):
    _record(tmp_path / "0", DEEPCACHE, {"macs_g": 0.3})
    assert "method" not in build_table(tmp_path) and "setting" not in build_table(tmp_path)


def test_a_failed_run_of_another_method_is_named_by_its_class(tmp_path):
    _record(tmp_path / "0", DEEPCACHE, {"macs_g": 0.3})
    d = tmp_path / "1"
    d.mkdir()
    settings = {"model": {"name": "digits", "weights": "pretrained"}, "sampler": {"name": "ddim", "steps": 20},
                "run": {"seed": 0, "num_samples": 8},
                "cache": {"_target_": "bench.caching.tgate.TGate", "gate_step": 30, "deepcache_interval": 1,
                          "deepcache_branch": 1}}
    (d / "run.json").write_text(json.dumps({"status": "failed", "error": "boom", "settings": settings}))
    df = build_table(tmp_path)
    failed = df[df["status"].eq("failed")].iloc[0]
    assert failed["method"] == "tgate" and failed["gate_step"] == 30


def test_summary_lines_name_the_method():
    assert format_row({**TGATE, "steps": 20, "speedup": 1.5}).startswith(f"20 steps, {TGATE['label']} | speed-up 1.50x")
    assert format_row({**DEEPCACHE, "steps": 20}).startswith("20 steps, uniform N=5 branch 1")


def test_pareto_front_against_a_hand_computed_one():
    x = pd.Series([1.0, 2.0, 3.0, 4.0, 2.5, 4.0])
    fid = pd.Series([10.0, 11.0, 12.0, 20.0, 11.5, 30.0])
    # lower FID better, higher speed-up better: (2.0, 11) beats nothing faster, (2.5, 11.5) is
    # dominated by nothing, (4, 30) is dominated by (4, 20)
    assert pareto_front(x, fid, "min") == ([1.0, 2.0, 2.5, 3.0, 4.0], [10.0, 11.0, 11.5, 12.0, 20.0])
    psnr = pd.Series([30.0, 32.0, 25.0, 20.0, 26.0, float("nan")])
    assert pareto_front(x, psnr, "max") == ([2.0, 2.5, 3.0, 4.0], [32.0, 26.0, 25.0, 20.0])  # (1, 30) < (2, 32)
    with pytest.raises(ValueError, match="front='best'"):
        pareto_front(x, psnr, "best")


def test__where_are_picked_by_where():
    df = pd.DataFrame({"model": ["digits", "sd15", "digits"], "x": [1, 2, 3]})
    assert list(_where(df, {"model": "digits"})["x"]) == [1, 3]
    assert list(_where(df, {"model": ["digits", "sd15"]})["x"]) == [1, 2, 3]
    assert _where(df, {"nope": 1}).empty and _where(df, {}) is df


def test_a_methods_table_renders_with_its_pareto_plot(tmp_path):
    _record(tmp_path / "0", DEEPCACHE, {"macs_g": 0.3, "speedup": 2.0, "fid": 5.0, "psnr": 20.0})
    _record(tmp_path / "1", {**FD, "label": "fd a"}, {"macs_g": 0.7, "speedup": 1.3, "fid": 4.5, "psnr": 25.0},
            "bench.caching.faster_diffusion.X")
    _record(tmp_path / "2", {**FD, "label": "fd b", "key_calls": [0]}, {"macs_g": 0.5, "speedup": 1.8, "fid": 6.0,
                                                                        "psnr": 18.0}, "bench.caching.faster_diffusion.X")
    spec = {"name": "methods", "title": "methods", "index": ["model", "method", "setting"],
            "values": {"macs_g": "MACs", "speedup": "Speed", "fid": "FID", "psnr": "PSNR"},
            "plots": [{"x": "speedup", "y": "fid", "series": ["method"], "where": {"model": "digits"}, "front": "min"}]}
    written = render(tmp_path, spec)
    assert {p.suffix for p in written} == {".csv", ".md", ".tex", ".png"}
    table = pd.read_csv(tmp_path / "methods.csv")
    assert set(table["Setting"] if "Setting" in table else table["setting"]) >= {"fd a", "fd b", "uniform N=5 branch 1"}


@pytest.mark.integration
def test_the_methods_experiment_runs_and_renders_on_the_embedded_model(tmp_path):
    """``experiment=methods``'s own grids on the digits model (shrunk), then its table and plots."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.cli import register
    from bench.run.runner import run
    from bench.run.sweeper import job_overrides
    from harness import ROOT, compose_cfg

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sweeper = compose("config", overrides=["experiment=methods"], return_hydra_config=True).hydra.sweeper
    grids = [g for g in OmegaConf.to_container(sweeper.grids) if g["model"] == "digits"]
    assert {g["cache"] for g in grids} == {"deepcache", "faster_diffusion", "block_caching"}
    shrunk = ["sampler.steps=10", "run.num_samples=8", "run.batch_size=8", "quality.is_split_size=8",
              "run.timing=off", "run.progress=false", f"run.store_dir={tmp_path}/store",
              f"metrics.cache_dir={tmp_path}/metrics", "metrics.fidelity=[psnr,ssim]"]
    jobs = job_overrides(None, grids, shrunk)
    assert len(jobs) == 12
    for i, job in enumerate(jobs):
        run(compose_cfg("experiment=methods", *job), tmp_path / "sweep" / str(i))
    written = render(tmp_path / "sweep")
    assert {p.name for p in written} == {"methods.csv", "methods.md", "methods.tex", "methods.png"}
    table = pd.read_csv(tmp_path / "sweep" / "methods.csv", dtype=str, keep_default_na=False)
    assert set(table["method"]) == {"none", "deepcache", "faster_diffusion", "block_caching"}
    assert (table.loc[table["method"] != "none", "psnr"] != "").all()
    assert "| block_caching " in (tmp_path / "sweep" / "methods.md").read_text()
