"""Quality intervals in the paper tables: ``value ±h`` cells, the interval columns in tableN.csv, error bars."""

import math

import pandas as pd
import pytest

from bench.report.paper import cell, layout, merge, plot, to_markdown

SPEC = {"name": "t", "index": ["schedule", "interval"], "values": {"fid": "FID", "speedup": "Speed"},
        "pivot": "schedule", "pivot_shared": "none"}


def _ours():
    return pd.DataFrame({
        "schedule": ["none", "uniform", "uniform"], "interval": [1, 5, 10],
        "fid": [9.343, 7.92, 8.5], "fid_low": [8.9, 7.5, float("nan")], "fid_high": [9.8, 8.4, float("nan")],
        "fid_delta": [float("nan"), -1.4, 0.2],  # the paired difference to the baseline stays out of the paper table
        "speedup": [1.0, 3.1, 5.0], "speedup_pm": [float("nan"), 0.02, 0.03],
        "speedup_low": [float("nan"), 3.0, 4.9], "speedup_high": [float("nan"), 3.2, 5.1],
    })


def test_quality_cells_show_their_halfwidth_and_the_csv_carries_the_interval():
    paper = pd.DataFrame({"schedule": ["none", "uniform"], "interval": ["1", "5"], "fid": ["3.4", "3.9"]})
    merged = merge(_ours(), paper, ["schedule", "interval"], ["fid", "speedup"], compared={"fid"})
    assert list(merged.columns) == ["schedule", "interval", "fid", "fid_low", "fid_high", "fid_paper", "fid_delta",
                                    "speedup", "speedup_pm"]  # the speed-up keeps its relative ±, once
    assert merged.loc[1, "fid_delta"] == pytest.approx(7.92 - 3.9)  # ours minus the paper's, as before
    md = to_markdown(layout(_ours(), paper, SPEC, compared={"fid"}), SPEC, [])
    assert "9.343 ±0.46 (3.4; +5.94)" in md  # max(9.8 - 9.343, 9.343 - 8.9) = 0.457
    assert "7.92 ±0.48 (3.9; +4.02)" in md
    assert "| 8.5 " in md and "8.5 ±" not in md  # no interval, no ±
    assert "3.1 ±2.0 %" in md and "3.1 ±2.0 % ±" not in md


def test_an_interval_off_centre_is_shown_by_its_larger_side():
    assert cell(10.0, low=9.0, high=10.2) == "10 ±1"
    assert cell(10.0, "9.5", 0.5, low=9.9, high=10.3) == "10 ±0.3 (9.5; +0.5)"
    assert cell(10.0, low=float("nan"), high=10.3) == "10"  # no whole interval, no ±


def test_the_plot_draws_the_quality_interval_as_error_bars(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    bars = []
    original = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, yerr=None, **kw: bars.append(
        (list(x), [list(e) for e in yerr])) or original(self, x, y, yerr=yerr, **kw))
    spec = {**SPEC, "plots": [{"x": "interval", "y": "fid", "series": ["schedule"]}]}
    assert plot(_ours(), None, spec, tmp_path / "t.png").is_file()
    below, above = {}, {}
    for x, (lo, hi) in bars:
        for xi, l, h in zip(x, lo, hi):
            below[xi], above[xi] = l, h
    assert below[1] == pytest.approx(9.343 - 8.9) and above[5] == pytest.approx(8.4 - 7.92)
    assert math.isnan(below[10])
