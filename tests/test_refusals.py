"""Every bad value is refused by :func:`bench.run.validate.check` -- before a model is
loaded or an image generated, in one line naming the setting and its valid values -- and
a setting that does not apply is recorded as not applying. (`tests/test_cli.py` runs a few
of these as a user does: exit status 2, no traceback.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.core.errors import HarnessError
from bench.report.records import write_json_atomic
from bench.run import validate
from bench.run.runner import run
from harness import compose_cfg

COST = ["run.mode=cost", "model.weights=random", "run.timing=off", "run.progress=false", "sampler.steps=10"]


def refused(*overrides: str) -> str:
    with pytest.raises(HarnessError) as e:
        validate.check(compose_cfg(*overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


def accepted(*overrides: str) -> None:
    validate.check(compose_cfg(*overrides))


def _no_nan(text: str):
    """JSON read back with a bare NaN refused (JSON has none)."""
    def bad(constant):
        if constant == "NaN":
            raise AssertionError("a bare NaN in JSON")
        return float(constant)
    return json.loads(text, parse_constant=bad)


# ------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("schedule", ["uniform", "nonuniform", "none"])
@pytest.mark.parametrize("override,expect", [
    ("cache.center=-5", "cache.center=-5.0 must lie in [0, 100]"),
    ("cache.center=101", "cache.center=101.0 must lie in [0, 100]"),
    ("cache.center=nan", "cache.center=nan must lie in [0, 100]"),
    ("cache.power=nan", "cache.power=nan must be a finite number > 1"),
    ("cache.power=inf", "cache.power=inf must be a finite number > 1"),  # the non-uniform search never ends
    ("cache.power=0", "cache.power=0.0 must be a finite number > 1"),
    ("cache.power=1", "cache.power=1.0 must be a finite number > 1"),
])
def test_center_and_power_are_refused_whatever_the_schedule(schedule, override, expect):
    assert expect in refused(f"cache.schedule={schedule}", "cache.interval=5", override)


def test_center_and_power_in_range_pass_with_any_schedule():
    for schedule in ("uniform", "nonuniform", "none"):
        accepted(f"cache.schedule={schedule}", "cache.interval=5", "cache.center=0", "cache.power=1.01")
        accepted(f"cache.schedule={schedule}", "cache.interval=5", "cache.center=100", "cache.power=1.4")


def test_a_setting_that_does_not_apply_is_recorded_as_null(tmp_path):
    """Uniform ignores center and power: the record's resolved cache section says null (the
    table's center/power cells stay empty); the settings section keeps what was given."""
    path = run(compose_cfg(*COST, "cache.interval=5", "cache.center=3", "cache.power=1.3"), tmp_path / "u")
    rec = json.loads(path.read_text())
    assert rec["cache"]["schedule"] == "uniform"
    assert rec["cache"]["center"] is None and rec["cache"]["power"] is None
    assert rec["settings"]["cache"]["center"] == 3
    path = run(compose_cfg(*COST, "cache.interval=5", "cache.schedule=nonuniform", "cache.center=3",
                           "cache.power=1.3"), tmp_path / "n")
    rec = json.loads(path.read_text())
    assert (rec["cache"]["center"], rec["cache"]["power"]) == (3, 1.3)


def test_a_failure_record_of_a_nan_setting_holds_no_bare_nan(tmp_path):
    with pytest.raises(HarnessError, match="cache.power=nan"):
        run(compose_cfg(*COST, "cache.power=nan"), tmp_path / "o")
    rec = _no_nan((tmp_path / "o" / "run.json").read_text())
    assert rec["status"] == "failed" and rec["settings"]["cache"]["power"] is None


def test_records_never_hold_a_bare_nan(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {
        "a": float("nan"), "b": np.float32("nan"), "c": [1.5, np.float64("nan"), np.array([np.nan, 2.0])],
        "d": np.int64(3), "e": True, "inf": float("inf"),  # the search's infeasible objective: kept
    })
    assert _no_nan(path.read_text()) == {
        "a": None, "b": None, "c": [1.5, None, [None, 2.0]], "d": 3, "e": True, "inf": float("inf")}


# ----------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("eta", ["-1", "1.5", "nan"])
def test_eta_outside_zero_one_is_refused(eta):
    assert f"sampler.eta={float(eta)} must be in [0, 1]" in refused("sampler=ddim", f"sampler.eta={eta}")
    accepted("sampler=ddim", "sampler.eta=1")


@pytest.mark.parametrize("key", ["sampler.steps", "run.baseline_steps"])
@pytest.mark.parametrize("steps", [0, 1001, 5000])
def test_steps_beyond_the_training_timesteps_are_refused_naming_the_setting(key, steps):
    message = refused(f"{key}={steps}")
    assert message.startswith(f"{key}={steps} must be between 1 and 1000")
    assert "num_train_timesteps" in message


def test_all_training_timesteps_are_a_valid_number_of_steps():
    accepted("sampler=ddpm", "sampler.steps=1000", "run.baseline_steps=1000")


# --------------------------------------------------------------------------------------------- run


def test_a_negative_seed_is_refused():
    assert refused("run.seed=-1").startswith("run.seed=-1 must be an integer >= 0")
    accepted("run.seed=0")


@pytest.mark.parametrize("value", ["", "' '"])
def test_an_empty_store_dir_is_refused(value):
    assert "run.store_dir is empty" in refused(f"run.store_dir={value}")


@pytest.mark.parametrize("model", ["digits", "sd15"])
@pytest.mark.parametrize("override,name", [
    ("run.labels.mode=list", "run.labels.mode=list"),
    ("run.labels.mode=per_class", "run.labels.mode=per_class"),
    ("run.labels.per_class=3", "run.labels.per_class=3"),
    ("run.labels.list=[1,2]", "run.labels.list=[1, 2]"),
])
def test_labels_on_a_model_without_classes_are_refused(model, override, name):
    message = refused(f"model={model}", "model.weights=random", "run.mode=cost", override)
    assert message.startswith(f"{name} applies to a class-conditional model (model.conditioning=class) only")
    assert "mode=random, per_class=50, list=[]" in message


def test_labels_on_a_class_conditional_model_are_checked_up_front():
    ldm = ["model=ldm_cin256", "model.weights=random", "sampler.steps=10"]
    accepted(*ldm, "run.mode=cost", "run.labels.mode=list", "run.labels.list=[1,2]")  # no images: unused
    gen = [*ldm, "run.mode=generate", "run.num_samples=2"]
    accepted(*gen, "run.labels.mode=list", "run.labels.list=[1,2]")
    assert "run.labels.list holds 1 labels; run.num_samples=2" in refused(*gen, "run.labels.mode=list",
                                                                          "run.labels.list=[1]")
    assert "run.labels.list holds [-1]" in refused(*gen, "run.labels.mode=list", "run.labels.list=[0,-1]")
    assert "run.labels.per_class=0 must be >= 1" in refused(*gen, "run.labels.mode=per_class",
                                                            "run.labels.per_class=0")


# ----------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("override,expect", [
    ("metrics.batch_size=0", "metrics.batch_size=0 must be an integer >= 1"),
    ("quality.batch_size=0", "quality.batch_size=0 must be an integer >= 1"),
    ("quality.k=0", "quality.k=0 must be an integer >= 1 (the k-th nearest neighbour"),
    ("quality.is_split_size=0", "quality.is_split_size=0 must be an integer >= 1"),
    ("quality.is_split_size=-3", "quality.is_split_size=-3 must be an integer >= 1"),
    ("quality.which=[fid,fdd]", "quality.which holds fdd; valid metrics: fid, sfid, is, precision, recall"),
    ("run.num_samples=3", "quality.k=3: precision/recall need more than k samples, run.num_samples=3"),
])
def test_quality_settings_are_refused_before_generating(override, expect):
    assert expect in refused("run.num_samples=64", override)


def test_quality_settings_apply_to_full_runs_only():
    accepted("run.mode=cost", "model.weights=random", "metrics.batch_size=0", "quality.k=0")
    accepted("quality.which=[fid,is]", "run.num_samples=3", "quality.is_split_size=3")  # no precision/recall: no k


def _folder(tmp_path, name: str, images: int, other: int = 0):
    from PIL import Image

    d = tmp_path / name
    (d / "sub").mkdir(parents=True)
    for i in range(images):
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(d / "sub" / f"{i}.png")
    for i in range(other):
        (d / f"notes{i}.txt").write_text("not an image")
    return d


def test_a_reference_folder_without_images_is_refused(tmp_path):
    empty = _folder(tmp_path, "empty", 0, other=2)
    assert refused(f"metrics.reference={empty}") == (
        f"metrics.reference={str(empty)!r} is a folder without images (.png, .jpg, .jpeg, .bmp, .webp, "
        "searched recursively)")
    few = _folder(tmp_path, "few", 3)
    assert f"metrics.reference={str(few)!r} holds 3" in refused(f"metrics.reference={few}")  # k = 3
    accepted(f"metrics.reference={_folder(tmp_path, 'enough', 4)}")


def test_the_reference_folder_is_counted_once_for_all_the_points_of_a_sweep(tmp_path):
    """The sweeper checks every point (and each run again): the folder is scanned once."""
    folder = _folder(tmp_path, "ref", 5)
    before = validate._reference_scan.cache_info().misses
    for interval in (1, 2, 3, 5):
        accepted(f"metrics.reference={folder}", f"cache.interval={interval}")
    assert validate._reference_scan.cache_info().misses - before == 1
