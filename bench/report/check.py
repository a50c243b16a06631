"""Regression gate: a sweep's table against a golden table, cell by cell, within tolerances.

    python -m bench.check <sweep_dir | table.csv> --against results/golden/digits_subset.csv
    python -m bench.check multirun/... --against golden.csv --tol fid=abs:0.05 --tol speedup=rel:0.1

Rows are matched on the setting columns of ``table.csv`` (:data:`bench.report.table.SETTING_COLUMNS`:
model, weights, sampler, steps, schedule, interval, branch, center, power, seed,
num_samples), except ``model_calls``, which follows from sampler and steps and is
compared as a cell. Every other column of the golden table is compared with its
tolerance:

* ``abs: t`` -- ``|got - golden| <= t`` (FID, IS, precision, recall);
* ``rel: t`` -- ``|got - golden| <= t * |golden|`` (MACs);
* ``exact`` -- the same value (``model_calls``, ``protocol``, ``status``, counts);
* ``ignore`` -- not compared. The timing columns (``throughput*``, ``speedup*``,
  ``timing_*``) depend on the machine and are ignored unless given a tolerance, and so
  are ``job`` and ``error``.

Tolerances live in a YAML file beside the golden table (``<golden>.tolerances.yaml``,
or ``--tolerances FILE``)::

    default: exact            # columns not listed
    columns:
      fid: {abs: 0.01}
      macs_g: {rel: 1.0e-5}
      job: ignore

and ``--tol COLUMN=abs:T|rel:T|exact|ignore`` overrides them. Both tables are read as
CSV text, so ``1`` and ``1.0`` are the same value; an empty cell matches only an empty
cell.

The output is a small diff table -- row, column, golden, got, tolerance, verdict -- of
every cell outside its tolerance and every golden row or column the table lacks (with
the nearest row when a row is missing, so a changed default shows as the setting that
moved). Exit status: 0 when everything is within tolerance (extra rows and columns of
the table are listed, not failed), 1 on a regression or a missing row or column, 2 on
bad input (one line).
"""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report.table import SETTING_COLUMNS, TABLE_NAME

KEY_COLUMNS = [c for c in SETTING_COLUMNS if c != "model_calls"]
# machine-dependent (timing) and bookkeeping columns: not compared unless given a tolerance
IGNORED = re.compile(r"^(throughput.*|speedup.*|timing_.*|wall_time.*|generation_time.*|job|error)$")


class CheckError(Exception):
    """Bad input: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Tolerance:
    kind: str  # abs | rel | exact | ignore
    value: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind} {self.value:g}" if self.kind in ("abs", "rel") else self.kind

    def accepts(self, golden: str, got: str) -> bool:
        if golden == "" or got == "":
            return golden == got
        if self.kind == "exact":
            return _canonical(golden) == _canonical(got)
        a, b = _number(golden), _number(got)
        if a is None or b is None:
            return False
        if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
            return str(a) == str(b)
        bound = self.value if self.kind == "abs" else self.value * abs(a)
        return abs(b - a) <= bound * (1 + 1e-12)


def parse_tolerance(column: str, spec: Any) -> Tolerance:
    """``{abs: 0.01}`` / ``{rel: 1e-5}`` / ``exact`` / ``ignore`` (YAML) or ``abs:0.01`` (command line)."""
    given = spec
    if isinstance(spec, str) and ":" in spec:
        kind, _, number = spec.partition(":")
        spec = {kind.strip(): number.strip()}
    if isinstance(spec, str) and spec in ("exact", "ignore"):
        return Tolerance(spec)
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, number), = spec.items()
        if kind in ("abs", "rel"):
            try:
                value = float(number)
            except (TypeError, ValueError):
                value = -1.0
            if value >= 0 and math.isfinite(value):
                return Tolerance(kind, value)
            raise CheckError(f"tolerance of {column}: {kind} needs a number >= 0, got {number!r}")
    raise CheckError(f"tolerance of {column}: {given!r} is not one of abs:<t>, rel:<t>, exact, ignore")


class Tolerances:
    """Per-column tolerances: the file's, then the command line's."""

    def __init__(self, columns: dict[str, Tolerance] | None = None, default: Tolerance = Tolerance("exact")):
        self.columns = dict(columns or {})
        self.default = default

    @classmethod
    def load(cls, path: str | Path | None) -> "Tolerances":
        if path is None:
            return cls()
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise CheckError(f"tolerances {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise CheckError(f"tolerances {path}: not YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict) or set(data) - {"default", "columns"}:
            raise CheckError(f"tolerances {path}: expected the keys 'default' and 'columns'")
        columns = data.get("columns") or {}
        if not isinstance(columns, dict):
            raise CheckError(f"tolerances {path}: 'columns' must map column names to tolerances")
        return cls({str(k): parse_tolerance(str(k), v) for k, v in columns.items()},
                   parse_tolerance("default", data.get("default", "exact")))

    def override(self, specs: list[str]) -> "Tolerances":
        for spec in specs:
            column, eq, tol = spec.partition("=")
            if not eq or not column:
                raise CheckError(f"--tol {spec!r}: expected COLUMN=abs:T, COLUMN=rel:T, COLUMN=exact or COLUMN=ignore")
            self.columns[column] = parse_tolerance(column, tol)
        return self

    def of(self, column: str) -> Tolerance:
        if column in self.columns:
            return self.columns[column]
        return Tolerance("ignore") if IGNORED.match(column) else self.default


# ---------------------------------------------------------------------------------------- tables


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    """A table.csv, a sweep directory's table.csv, or (no table yet) one built from its records."""
    path = Path(path)
    if path.is_dir():
        if (path / TABLE_NAME).is_file():
            path = path / TABLE_NAME
        else:
            from bench.report.table import build_table

            try:
                df = build_table(path)
            except FileNotFoundError:
                raise CheckError(f"{what} {path}: no {TABLE_NAME} and no run records") from None
            text = df.to_csv(index=False, float_format="%.6g")  # as bench.report.table.write_csv writes it
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    if not path.is_file():
        raise CheckError(f"{what} {path}: no such file or directory")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CheckError(f"{what} {path}: not a CSV table ({' '.join(str(e).split())})") from None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _canonical(text: str) -> str:
    """Numbers as numbers (``1`` == ``1.0`` == ``1e0``), anything else as written."""
    x = _number(text)
    if x is None:
        return text.strip()
    if x.is_integer():
        return str(int(x))
    return repr(x)


def _key(row: pd.Series, columns: list[str]) -> tuple[str, ...]:
    return tuple(_canonical(row[c]) if row[c] != "" else "" for c in columns)


@dataclass
class Finding:
    row: str
    column: str
    golden: str
    got: str
    tolerance: str
    verdict: str  # ok | FAIL | MISSING | extra


def compare(table: pd.DataFrame, golden: pd.DataFrame, tolerances: Tolerances) -> tuple[list[Finding], int]:
    """Every finding (cells outside tolerance, missing and extra rows/columns) and the number
    of cells compared."""
    key_cols = [c for c in KEY_COLUMNS if c in golden.columns]
    if not key_cols:
        raise CheckError(f"the golden table has none of the setting columns ({', '.join(KEY_COLUMNS)})")
    missing_key = [c for c in key_cols if c not in table.columns]
    if missing_key:
        raise CheckError(f"the table lacks the setting columns {', '.join(missing_key)} of the golden table")
    gkeys = [_key(r, key_cols) for _, r in golden.iterrows()]
    dup = next((k for k in gkeys if gkeys.count(k) > 1), None)
    absent = [c for c in KEY_COLUMNS if c not in golden.columns and c in table.columns]
    unmatched_setting(table, key_cols, absent)  # names a setting column the golden rows need
    if dup is not None:
        label = _label(dict(zip(key_cols, dup)), key_cols)
        rows = golden[[k == dup for k in gkeys]].drop_duplicates()
        lacking = [c for c in KEY_COLUMNS if c not in golden.columns]
        if len(rows) > 1 and lacking:  # not a repeated row: rows of settings the table cannot tell apart
            raise CheckError(
                f"the golden table has two rows with the settings {label} and lacks the setting column(s) "
                f"{', '.join(lacking)}: add the one that tells them apart"
            )
        raise CheckError(f"the golden table has two rows with the settings {label}")
    varying = [c for c in key_cols if golden[c].nunique() > 1] or key_cols
    got = {}
    for _, r in table.iterrows():
        got.setdefault(_key(r, key_cols), r)  # a sweep's table lists a shared baseline once

    findings: list[Finding] = []
    compared = 0
    columns = [c for c in golden.columns if c not in key_cols]
    for c in columns:
        if c not in table.columns and tolerances.of(c).kind != "ignore":
            findings.append(Finding("(all rows)", c, "column", "—", str(tolerances.of(c)), "MISSING"))
    for gk, (_, g) in zip(gkeys, golden.iterrows()):
        label = _label(dict(zip(key_cols, gk)), varying)
        r = got.get(gk)
        if r is None:
            findings.append(Finding(label, "(row)", "present", _nearest(gk, list(got), key_cols), "", "MISSING"))
            continue
        for c in columns:
            tol = tolerances.of(c)
            if tol.kind == "ignore" or c not in table.columns:
                continue
            compared += 1
            ok = tol.accepts(g[c], r[c])
            if not ok:
                findings.append(Finding(label, c, g[c] or "(empty)", r[c] or "(empty)", str(tol), "FAIL"))
    for k in got:
        if k not in gkeys:
            findings.append(Finding(_label(dict(zip(key_cols, k)), varying), "(row)", "—", "present", "", "extra"))
    return findings, compared


def unmatched_setting(table: pd.DataFrame, key_cols: list[str], absent: list[str]) -> None:
    """Refuse a golden table that lacks a setting column (``absent``) in which rows of the
    table with the same golden settings differ: which of them a golden row means is unknown."""
    seen: dict[tuple[str, ...], pd.Series] = {}
    for _, r in table.iterrows():
        k = _key(r, key_cols)
        first = seen.setdefault(k, r)
        differ = [c for c in absent if _canonical(first[c]) != _canonical(r[c])]
        if differ:
            c = differ[0]
            raise CheckError(
                f"the golden table lacks the setting column {c}, in which rows of the table with the settings "
                f"{_label(dict(zip(key_cols, k)), key_cols)} differ ({c}={first[c] or '—'} and {c}={r[c] or '—'}); "
                f"add it to the golden table"
            )


def _label(key: dict[str, str], columns: list[str]) -> str:
    return " ".join(f"{c}={key[c] or '—'}" for c in columns)


def _nearest(key: tuple[str, ...], keys: list[tuple[str, ...]], columns: list[str]) -> str:
    """The table's row with the most settings in common, as the settings that differ."""
    if not keys:
        return "(no rows)"
    best = max(keys, key=lambda k: sum(a == b for a, b in zip(key, k)))
    diff = [f"{c}: {a or '—'} -> {b or '—'}" for c, a, b in zip(columns, key, best) if a != b]
    return "nearest row differs in " + ", ".join(diff)


def format_findings(findings: list[Finding]) -> str:
    headers = ("row", "column", "golden", "got", "tolerance", "verdict")
    rows = [headers] + [(f.row, f.column, f.golden, f.got, f.tolerance, f.verdict) for f in findings]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def default_tolerances_path(golden: Path) -> Path:
    """``<golden>.tolerances.yaml`` beside ``<golden>.csv``."""
    return golden.with_name(golden.name.removesuffix(".csv") + ".tolerances.yaml")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        print(f"error: {message} (python -m bench.check --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m bench.check", description="Compare a sweep's table with a golden table within tolerances.")
    parser.add_argument("table", help="sweep directory (its table.csv, else its run records) or a table.csv")
    parser.add_argument("--against", required=True, metavar="GOLDEN_CSV", help="the golden table")
    parser.add_argument("--tolerances", metavar="YAML",
                        help="tolerance file (default: <golden>.tolerances.yaml beside the golden table, if any)")
    parser.add_argument("--tol", action="append", default=[], metavar="COLUMN=abs:T|rel:T|exact|ignore",
                        help="override one column's tolerance (repeatable)")
    args = parser.parse_args(argv)
    try:
        golden_path = Path(args.against)
        golden = read_table(golden_path, "golden table")
        tol_path = args.tolerances
        if tol_path is None and default_tolerances_path(golden_path).is_file():
            tol_path = default_tolerances_path(golden_path)
        tolerances = Tolerances.load(tol_path).override(args.tol)
        table = read_table(args.table, "table")
        findings, compared = compare(table, golden, tolerances)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [f for f in findings if f.verdict in ("FAIL", "MISSING")]
    extra = [f for f in findings if f.verdict == "extra"]
    if findings:
        print(format_findings(bad + extra))
    rows = len(golden)
    if bad:
        print(f"check FAILED against {golden_path}: {len(bad)} finding(s) "
              f"({compared} cells of {rows} golden rows compared)")
        return 1
    print(f"check passed against {golden_path}: {compared} cells of {rows} golden rows within tolerance"
          + (f" ({len(extra)} extra row(s) not in the golden table)" if extra else ""))
    return 0

