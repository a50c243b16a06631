"""An incomplete sweep is never a complete-looking table: a job that left no run.json (killed,
lost, never started) is a ``missing`` row, and the report and the sweep exit 1 naming it."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from bench.report.__main__ import main as report_main
from bench.report.jobs import JOBS_NAME
from bench.report.paper import render
from bench.report.sweep import write_tables
from bench.report.table import build_table, print_summary
from harness import run_py

SWEEP = ["-m", "run.mode=cost", "model.weights=random", "sampler.steps=10", "cache.interval=2,3,5",
         "run.timing=off", "run.progress=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real three-job sweep (cost runs of the digits model, random weights): job n has interval 2, 3, 5."""
    root = tmp_path_factory.mktemp("missing")
    r = run_py(*SWEEP, f"run.store_dir={root}/store", f"hydra.sweep.dir={root}/sweep")
    assert r.returncode == 0, r.stderr
    return root / "sweep"


@pytest.fixture
def copy(sweep, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(sweep, out)
    return out


def test_the_sweeper_lists_its_jobs_before_the_first_starts(sweep):
    jobs = json.loads((sweep / JOBS_NAME).read_text())["jobs"]
    assert [j["job"] for j in jobs] == ["0", "1", "2"] and [j["num"] for j in jobs] == [0, 1, 2]
    assert [[o for o in j["overrides"] if o.startswith("cache.interval=")] for j in jobs] == [
        ["cache.interval=2"], ["cache.interval=3"], ["cache.interval=5"]]
    for j in jobs:  # the settings the job's record carries
        assert j["settings"] == json.loads((sweep / j["job"] / "run.json").read_text())["settings"]
    # written before Hydra made the first job's folder
    assert (sweep / JOBS_NAME).stat().st_mtime_ns <= (sweep / "0" / ".hydra" / "overrides.yaml").stat().st_mtime_ns


def test_a_complete_sweep_exits_0_with_the_same_table(copy, capsys):
    before = (copy / "table.csv").read_text()
    assert report_main([str(copy)]) == 0
    assert (copy / "table.csv").read_text() == before
    assert "missing" not in before and "missing" not in capsys.readouterr().err
    # an old sweep (no jobs.json, no Hydra folders): the same table from the records alone
    (copy / JOBS_NAME).unlink()
    for d in copy.glob("*/.hydra"):
        shutil.rmtree(d)
    assert report_main([str(copy)]) == 0
    assert (copy / "table.csv").read_text() == before


def _missing_row(df: pd.DataFrame, job: str) -> pd.Series:
    rows = df[df["job"] == job]
    assert len(rows) == 1, df
    row = rows.iloc[0]
    assert row["status"] == "missing"
    assert "no run.json" in row["error"] and "rerun the sweep command" in row["error"]
    return row


def test_a_job_without_run_json_is_a_missing_row_and_exit_1(copy, capsys):
    complete = pd.read_csv(copy / "table.csv", dtype={"job": str})
    (copy / "1" / "run.json").unlink()
    df = build_table(copy)
    assert list(df["job"]) == ["0", "0", "1", "2"]
    row = _missing_row(df, "1")
    # its settings come from jobs.json
    assert (row["model"], row["sampler"], row["steps"], row["schedule"], row["interval"]) == (
        "digits", "ddim", 10, "uniform", 3)
    assert pd.isna(row["macs_g"])
    # the other rows are as in the complete table
    others = df[df["job"] != "1"].drop(columns=["error"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(others, complete[complete["job"] != "1"].reset_index(drop=True),
                                  check_dtype=False)

    assert report_main([str(copy)]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 jobs left no run.json (job 1)" in err
    written = pd.read_csv(copy / "table.csv", dtype={"job": str})
    assert list(written["status"]) == ["ok", "ok", "missing", "ok"]

    print_summary(df)
    out = capsys.readouterr().out
    assert "[1] MISSING" in out and "interval=3" in out and "FAILED" not in out


def test_without_jobs_json_the_job_folders_list_the_jobs(copy, capsys):
    (copy / JOBS_NAME).unlink()
    (copy / "1" / "run.json").unlink()
    row = _missing_row(build_table(copy), "1")
    # settings as far as the job's overrides say
    assert (row["weights"], row["steps"], row["interval"]) == ("random", 10, 3)
    assert pd.isna(row["model"])
    assert report_main([str(copy)]) == 1
    assert "(job 1)" in capsys.readouterr().err


def test_a_listed_job_that_never_started(copy, capsys):
    """jobs.json lists a job that has no folder at all; its overrides say what they can."""
    jobs = json.loads((copy / JOBS_NAME).read_text())
    jobs["jobs"].append({"job": "3", "num": 3, "overrides": ["sampler.steps=20", "cache.interval=10"]})
    (copy / JOBS_NAME).write_text(json.dumps(jobs))
    df = build_table(copy)
    assert list(df["job"]) == ["0", "0", "1", "2", "3"]
    row = _missing_row(df, "3")
    assert (row["steps"], row["interval"]) == (20, 10)
    assert report_main([str(copy)]) == 1
    assert "1 of 4 jobs left no run.json (job 3)" in capsys.readouterr().err


def test_the_sweepers_end_of_sweep_table_reports_missing_jobs(copy, capsys):
    from bench.run.sweeper import finish

    assert finish(copy) == []
    (copy / "1" / "run.json").unlink()
    (copy / "2" / "run.json").unlink()
    assert finish(copy) == ["1", "2"]  # run_sweep exits 1 on these
    captured = capsys.readouterr()
    assert "[1] MISSING" in captured.out and "[2] MISSING" in captured.out
    assert "2 of 3 jobs left no run.json (job 1, 2)" in captured.err


def test_paper_table_leaves_missing_rows_out(copy):
    spec = {"name": "tiny", "index": ["interval"], "values": {"macs_g": "MACs"}}
    (copy / "1" / "run.json").unlink()
    paths = render(copy, spec)
    assert copy / "tiny.csv" in paths
    tiny = pd.read_csv(copy / "tiny.csv")
    assert list(tiny["interval"]) == [1, 2, 5]  # the baseline, jobs 0 and 2
    assert tiny["macs_g"].notna().all()


def test_a_sweep_whose_jobs_all_left_no_record(copy, capsys):
    for p in copy.glob("*/run.json"):
        p.unlink()
    tables = write_tables(copy)
    assert list(tables.table["status"]) == ["missing"] * 3 and tables.paper == []
    assert tables.missing == ["0", "1", "2"]
    assert report_main([str(copy)]) == 1
    assert "3 of 3 jobs left no run.json (job 0, 1, 2)" in capsys.readouterr().err
