"""The regression gate (`python -m bench.check`): the shipped golden table passes against
itself, a cell moved past its tolerance fails naming the row and column, missing rows and
bad input are caught. `.ci/run` runs the real subset once and checks it (not repeated here)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from bench.report.check import main
from harness import ROOT

GOLDEN = ROOT / "results" / "golden" / "digits_subset.csv"
TOLERANCES = ROOT / "results" / "golden" / "digits_subset.tolerances.yaml"
N5 = "schedule=uniform interval=5 branch=1 center=— power=—"


def _golden() -> pd.DataFrame:
    return pd.read_csv(GOLDEN, dtype=str, keep_default_na=False)


def _write(df: pd.DataFrame, path) -> str:
    df.to_csv(path, index=False)
    return str(path)


def _row(df: pd.DataFrame, schedule: str, interval: str) -> int:
    return int(df.index[(df["schedule"] == schedule) & (df["interval"] == interval)][0])


def check(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_golden_table_passes_against_itself(capsys):
    rc, out, _ = check(capsys, str(GOLDEN), "--against", str(GOLDEN))
    assert rc == 0
    # five rows; every column but the ignored job is compared
    assert f"check passed against {GOLDEN}: 85 cells of 5 golden rows within tolerance" in out


@pytest.mark.parametrize("delta,rc", [(0.05, 1), (0.004, 0), (-0.0049, 0), (-0.006, 1)])
def test_a_moved_fid_in_the_golden_subset_fails_naming_the_cell(tmp_path, capsys, delta, rc):
    """A perturbed copy of the golden table (with its tolerance file beside it) as the golden:
    the real numbers now differ from it by `delta` in one FID cell."""
    golden = _golden()
    i = _row(golden, "uniform", "5")
    moved = float(golden.loc[i, "fid"]) + delta
    golden.loc[i, "fid"] = f"{moved:.6g}"
    shutil.copy(TOLERANCES, tmp_path / "perturbed.tolerances.yaml")
    got_rc, out, _ = check(capsys, str(GOLDEN), "--against", _write(golden, tmp_path / "perturbed.csv"))
    assert got_rc == rc, out
    if rc:
        lines = [line for line in out.splitlines() if "FAIL" in line and " fid " in line]
        assert len(lines) == 1 and N5 in lines[0] and f"{moved:.6g}" in lines[0] and "abs 0.005" in lines[0]
        assert re.search(r"check FAILED .*: 1 finding", out)


def test_the_command_line_overrides_a_tolerance(tmp_path, capsys):
    table = _golden()
    i = _row(table, "uniform", "5")
    table.loc[i, "fid"] = str(float(table.loc[i, "fid"]) + 0.05)
    path = _write(table, tmp_path / "t.csv")
    assert check(capsys, path, "--against", str(GOLDEN))[0] == 1
    assert check(capsys, path, "--against", str(GOLDEN), "--tol", "fid=abs:0.1")[0] == 0
    assert check(capsys, path, "--against", str(GOLDEN), "--tol", "fid=ignore")[0] == 0


@pytest.mark.parametrize(
    "column,value,expect",
    [
        ("macs_g", lambda v: float(v) * (1 + 1e-4), "rel 1e-05"),  # MACs: relative
        ("model_calls", lambda v: "21", "exact"),  # derived setting: exact
        ("protocol", lambda v: "adm/inception-v3-compat", "exact"),
        ("precision", lambda v: float(v) - 2 / 64, "abs 0.016"),  # two k-NN decisions
        ("is_mean", lambda v: float(v) + 0.003, "abs 0.002"),
    ],
)
def test_each_kind_of_tolerance_catches_its_column(tmp_path, capsys, column, value, expect):
    table = _golden()
    i = _row(table, "nonuniform", "2")
    table.loc[i, column] = str(value(table.loc[i, column]))
    rc, out, _ = check(capsys, _write(table, tmp_path / "t.csv"), "--against", str(GOLDEN))
    assert rc == 1
    line = next(line for line in out.splitlines() if "FAIL" in line)
    assert f" {column} " in line and expect in line and "schedule=nonuniform interval=2" in line


def test_macs_within_the_tables_rounding_pass(tmp_path, capsys):
    table = _golden()
    table["macs_g"] = [f"{float(v) * (1 + 2e-6):.7g}" for v in table["macs_g"]]
    assert check(capsys, _write(table, tmp_path / "t.csv"), "--against", str(GOLDEN))[0] == 0


def test_a_missing_row_names_the_setting_that_moved(tmp_path, capsys):
    """A changed default branch: the golden row is missing and the nearest row says why; the
    table's new row is listed as extra."""
    table = _golden()
    table.loc[_row(table, "uniform", "2"), "branch"] = "2"
    rc, out, _ = check(capsys, _write(table, tmp_path / "t.csv"), "--against", str(GOLDEN))
    assert rc == 1
    missing = next(line for line in out.splitlines() if "MISSING" in line)
    assert "schedule=uniform interval=2 branch=1" in missing and "nearest row differs in branch: 1 -> 2" in missing
    assert any("extra" in line and "branch=2" in line for line in out.splitlines())


def test_a_failed_row_fails(tmp_path, capsys):
    table = _golden()
    i = _row(table, "uniform", "5")
    table.loc[i, ["fid", "is_mean", "status"]] = ["", "", "failed"]
    rc, out, _ = check(capsys, _write(table, tmp_path / "t.csv"), "--against", str(GOLDEN))
    assert rc == 1
    failed = [line for line in out.splitlines() if line.endswith("FAIL")]
    for column in ("fid", "is_mean", "status"):
        assert any(f" {column} " in line and N5 in line for line in failed), column
    assert any(" status " in line and " ok " in line and " failed " in line for line in failed)


def test_timing_columns_are_compared_only_when_given_a_tolerance(tmp_path, capsys):
    golden, table = _golden(), _golden()
    golden["throughput"], table["throughput"] = "10.0", "13.0"
    golden["speedup"], table["speedup"] = "2.0", "2.1"
    args = [_write(table, tmp_path / "t.csv"), "--against", _write(golden, tmp_path / "g.csv")]
    assert check(capsys, *args)[0] == 0
    rc, out, _ = check(capsys, *args, "--tol", "throughput=rel:0.2", "--tol", "speedup=rel:0.1")
    assert rc == 1 and " throughput " in out and " speedup " not in out


def test_a_golden_column_the_table_lacks_fails(tmp_path, capsys):
    table = _golden().drop(columns=["recall"])
    rc, out, _ = check(capsys, _write(table, tmp_path / "t.csv"), "--against", str(GOLDEN))
    assert rc == 1 and re.search(r"\(all rows\)\s+recall\s+column .* MISSING", out)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["{tmp}/none.csv", "--against", "{golden}"], "error: table {tmp}/none.csv: no such file or directory"),
        (["{golden}", "--against", "{tmp}/none.csv"], "error: golden table {tmp}/none.csv: no such file"),
        (["{golden}", "--against", "{golden}", "--tol", "fid=abs:x"], "tolerance of fid: abs needs a number >= 0"),
        (["{golden}", "--against", "{golden}", "--tol", "fid"], "--tol 'fid': expected COLUMN=abs:T"),
        (["{golden}", "--against", "{golden}", "--tol", "fid=near:1"], "'near:1' is not one of abs:<t>, rel:<t>"),
        (["{golden}", "--against", "{golden}", "--tolerances", "{tmp}/bad.yaml"], "tolerance of fid: 'roughly'"),
        (["{golden}", "--against", "{tmp}/dup.csv"], "the golden table has two rows with the settings"),
        (["{tmp}", "--against", "{golden}"], "no table.csv and no run records"),
        (["{golden}"], "the following arguments are required: --against"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, expect):
    (tmp_path / "bad.yaml").write_text("columns:\n  fid: roughly\n")
    golden = _golden()
    _write(pd.concat([golden, golden.iloc[[0]]]), tmp_path / "dup.csv")
    args = [a.format(tmp=tmp_path, golden=GOLDEN) for a in args]
    try:
        rc, out, err = check(capsys, *args)
    except SystemExit as e:  # argparse
        rc, (out, err) = e.code, capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert expect.format(tmp=tmp_path) in err


@pytest.mark.integration
def test_the_module_runs_as_a_command(tmp_path):
    table = _golden()
    table.loc[_row(table, "uniform", "5"), "fid"] = "30"
    r = subprocess.run([sys.executable, "-m", "bench.check", _write(table, tmp_path / "t.csv"), "--against",
                        str(GOLDEN)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL" in r.stdout and N5 in r.stdout


def _run_py_overrides(text: str) -> list[str]:
    """The overrides of the `python run.py -m ...` command in a shell text (continuations joined)."""
    text = text.replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith("python run.py -m"))
    return shlex.split(line)[3:]


def test_ci_runs_the_tests_then_the_documented_golden_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "results" / "golden" / "README.md").read_text()
    assert _run_py_overrides(ci) == _run_py_overrides(readme)
    assert "python -m bench.check $work/sweep --against results/golden/digits_subset.csv" in ci
    assert ci.index("python -m pytest") < ci.index("python run.py -m") < ci.index("python -m bench.check")


@pytest.mark.parametrize("tolerance,golden,got,ok", [
    (("abs", 0.0), "0.7", "0.7", True),  # a zero tolerance accepts an equal value
    (("abs", 0.0), "0.7", "0.7000001", False),
    (("rel", 0.0), "0", "0", True),  # rel with golden 0: a bound of 0
    (("rel", 0.5), "0", "0", True),
    (("rel", 0.5), "0", "1e-300", False),
    (("rel", 0.1), "10", "11", True),  # exactly on the bound
    (("rel", 0.1), "10", "9", True),
    (("abs", 0.1), "0.7", "0.8", True),  # 0.8 - 0.7 = 0.10000000000000009 in floats: still within
    (("abs", 0.1), "0.8", "0.7", True),
    (("abs", 0.1), "0.7", "0.81", False),
    (("abs", 0.1), "0.7", "0.59", False),
])
def test_a_tolerance_bound_is_inclusive_with_float_slack(tolerance, golden, got, ok):
    from bench.report.check import Tolerance

    assert Tolerance(*tolerance).accepts(golden, got) is ok


def test_zero_and_float_slack_tolerances_on_the_command_line(tmp_path, capsys):
    golden = pd.DataFrame({"model": ["a", "b"], "fid": ["0.7", "0"], "macs_g": ["2.5", "0"]})
    g = _write(golden, tmp_path / "g.csv")
    assert check(capsys, g, "--against", g, "--tol", "fid=abs:0", "--tol", "macs_g=rel:0")[0] == 0
    for fid, rc in (("0.8", 0), ("0.81", 1)):
        table = golden.assign(fid=[fid, "0"])
        assert check(capsys, _write(table, tmp_path / "t.csv"), "--against", g, "--tol", "fid=abs:0.1")[0] == rc


def test_a_golden_table_lacking_a_setting_column_names_it(tmp_path, capsys):
    """Without its interval column the golden subset's N = 2 and N = 5 rows look alike: the
    error names the column, not just "two rows with the same settings"."""
    golden = _write(_golden().drop(columns=["interval"]), tmp_path / "g.csv")
    rc, out, err = check(capsys, str(GOLDEN), "--against", golden)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "the golden table lacks the setting column interval" in err
    assert "(interval=2 and interval=5)" in err
    # neither table has the column: the golden table's two rows name what it lacks
    table = _write(_golden().drop(columns=["interval"]), tmp_path / "t.csv")
    rc, out, err = check(capsys, table, "--against", golden)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "and lacks the setting column(s) prompts, interval" in err


def test_a_golden_table_lacking_a_column_that_changes_nothing_still_passes(capsys, tmp_path):
    """The digits subset has no prompts column (one prompt set, none): nothing to tell apart."""
    golden = _write(_golden().drop(columns=["seed"]), tmp_path / "g.csv")
    assert check(capsys, str(GOLDEN), "--against", golden)[0] == 0
