"""``run.mode=plan``: jobs, images to generate (shared baseline once, the store's holdings
subtracted), MACs, estimated time per device kind, disk -- and nothing generated."""

from __future__ import annotations

import json
import re

import pytest

from bench.caching.method import apply
from bench.cost import measure
from bench.models import loading as models
from bench.run.parts import resolve
from bench.run.plan import plan_jobs, summary, throughput_table, write_plan
from bench.run.runner import run
from harness import compose_cfg, run_py

FAST = ["sampler.steps=10", "run.progress=false", "run.timing=off", "run.batch_size=4"]


def _cfgs(store, *intervals, n=8):
    return [compose_cfg(*FAST, f"run.num_samples={n}", f"cache.interval={i}", f"run.store_dir={store}")
            for i in intervals]


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*")) if root.exists() else []


def test_a_shared_baseline_is_counted_once_and_nothing_is_written(tmp_path):
    store = tmp_path / "store"
    plan = plan_jobs(_cfgs(store, 2, 5), ["0", "1"])
    rows, t = plan["rows"], plan["totals"]
    assert [r["new_images"] for r in rows] == [8, 8]
    assert rows[0]["baseline_new_images"] == 8 and "baseline_new_images" not in rows[1]
    assert rows[0]["baseline_store"] == rows[1]["baseline_store"]
    assert t["jobs"] == 2 and t["images_to_generate"] == 24 and t["images_in_store"] == 0
    assert t["disk_bytes"] == 24 * 16 * 16 * 1  # digits: 16 x 16 grey uint8
    assert not store.exists()


def test_what_the_store_holds_is_subtracted(tmp_path):
    store = tmp_path / "store"
    run(compose_cfg(*FAST, "run.mode=generate", "run.num_samples=6", "cache.interval=5",
                    f"run.store_dir={store}"), tmp_path / "gen")
    before = _files(store)
    rows = plan_jobs(_cfgs(store, 5, 2, n=10), ["a", "b"])["rows"]
    assert (rows[0]["new_images"], rows[0]["held_images"]) == (4, 6)
    assert (rows[0]["baseline_new_images"], rows[0]["baseline_held_images"]) == (4, 6)
    assert (rows[1]["new_images"], rows[1]["held_images"]) == (10, 0)  # another interval: its own store
    assert _files(store) == before  # read only


def test_time_is_the_jobs_macs_over_the_measured_rate():
    """A device that made ``r`` uncached images/s at ``T`` calls: the baseline of ``n`` images at the
    same steps takes ``n / r``; a cached job's images take their MACs-predicted share of that."""
    cfg = _cfgs("/nonexistent-store", 5, n=100)[0]
    table = [{"device_kind": "k", "model": "digits", "dtype": "float32", "images_per_s": 4.0, "model_calls": 10}]
    row = plan_jobs([cfg], ["0"], table)["rows"][0]
    parts = resolve(cfg)
    loaded = models.load_model(parts.model)
    m = measure.macs_record(loaded, parts.model, apply(parts.cache, loaded.unet, 10))
    base_s, cached_s = 100 / 4.0, 100 / 4.0 / m["macs_predicted_speedup"]
    assert row["hours_k"] * 3600 == pytest.approx(base_s + cached_s, rel=1e-9)


def test_a_device_without_a_measurement_of_the_model_has_no_estimate(tmp_path):
    table = [{"device_kind": "k", "model": "ddpm_cifar10", "dtype": "float32", "images_per_s": 1.0, "model_calls": 100}]
    plan = plan_jobs(_cfgs(tmp_path, 5), ["0"], table)
    assert plan["rows"][0]["hours_k"] is None and plan["totals"]["hours_k"] is None
    assert "k: not measured for digits" in summary(plan)


def test_the_plan_files(tmp_path):
    plan = plan_jobs(_cfgs(tmp_path / "s", 2, 5), ["0", "1"])
    write_plan(tmp_path / "out", plan)
    lines = (tmp_path / "out" / "plan.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("job,model,sampler,steps")
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["totals"]["jobs"] == 2


def test_the_shipped_throughput_table_has_the_gpu_benchmark():
    rows = throughput_table()
    h200 = {r["model"] for r in rows if r["device_kind"] == "nvidia-h200"}
    assert {"ddpm_cifar10", "sd15", "ldm_cin256"} <= h200
    assert all(r["images_per_s"] > 0 and r["model_calls"] > 0 for r in rows)


@pytest.mark.integration
def test_table9_prints_its_jobs_and_gpu_hours_and_runs_nothing(tmp_path):
    """The 150-point search table on a tiny converted LDM (the real model's name, so the H200
    measurement applies): a plan in seconds, no job folder, no image."""
    import ldm_original as lo
    from bench.models.convert import main as convert_main

    model, ckpt, config = lo.write_tiny_checkpoint(tmp_path)
    assert convert_main(["ldm", str(ckpt), str(config), str(tmp_path / "ldm")]) == 0
    r = run_py("-m", "experiment=table9", f"model.pretrained={tmp_path}/ldm", "run.mode=plan",
               f"run.store_dir={tmp_path}/store", f"hydra.sweep.dir={tmp_path}/sweep", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-2]
    assert last.startswith("plan: 150 jobs, 7500000 images to generate") and "nvidia-h200: " in last
    assert re.search(r"nvidia-h200: \d+(\.\d)? (h|min) ", last)
    assert not (tmp_path / "store").exists() and not list((tmp_path / "sweep").glob("*/run.json"))
    assert len((tmp_path / "sweep" / "plan.csv").read_text().splitlines()) == 151


@pytest.mark.integration
def test_a_plan_of_one_run_from_the_command_line(tmp_path):
    r = run_py(*FAST, "run.mode=plan", "run.num_samples=8", f"run.store_dir={tmp_path}/store",
               f"hydra.run.dir={tmp_path}/out")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plan: 1 jobs, 16 images to generate" in r.stdout and (tmp_path / "out" / "plan.csv").is_file()
    assert not (tmp_path / "store").exists() and not (tmp_path / "out" / "run.json").exists()
