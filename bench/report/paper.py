"""The paper's tables from a sweep: our numbers beside the paper's, in the paper's layout.

An experiment file (``conf/experiment/tableN.yaml``) carries a ``table`` spec
(:class:`bench.run.config.TableSpec`); every run record of its sweep holds it, so the
table is rendered from the records alone -- at the end of the sweep, or at any time
with ``python -m bench.report <sweep_dir>``. Written into the sweep directory:

* ``tableN.csv``: the paper's rows and columns; for each value ours, ``<value>_paper``
  and ``<value>_delta`` (ours minus the paper's);
* ``tableN.md`` and ``tableN.tex`` (booktabs): the same for people, with notes saying
  which columns are comparable with the paper and on what our numbers were measured;
* ``tableN.png``: the table's figures (ours solid, the paper's dashed).

The paper's numbers are read from ``results/paper/<file>.csv`` (typed in by hand).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from bench.core.resources import PACKAGE_DIR
from bench.report.table import build_table, fmt, load_records, write_csv
from metrics.files import atomic_write, atomic_write_bytes


def _paper_dirs() -> list[Path]:
    """results/paper of a checkout, else the copy installed as the package ``bench.paper``."""
    dirs = [PACKAGE_DIR.parent / "results" / "paper"]
    try:
        import bench.paper

        dirs += [Path(p) for p in bench.paper.__path__]
    except ImportError:
        pass
    return dirs
TIMING_COLUMNS = {"throughput", "throughput_baseline", "speedup", "speedup_low", "speedup_high", "speedup_pm"}
QUALITY_COLUMNS = {"fid", "sfid", "is_mean", "precision", "recall", "clip_score"}


def spec_of(records: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The table spec the sweep's runs were made for (None: not a paper-table sweep)."""
    for _, rec in records:
        spec = (rec.get("settings") or {}).get("table")
        if spec:
            return spec
    return None


def paper_table(spec: dict[str, Any]) -> pd.DataFrame | None:
    """The paper's rows of this table, with our column names."""
    if not spec.get("paper"):
        return None
    for d in _paper_dirs():
        path = d / spec["paper"]
        if path.is_file():
            break
    else:
        return None
    df = pd.read_csv(path)
    for col, want in (spec.get("paper_where") or {}).items():
        wanted = want if isinstance(want, list) else [want]
        df = df[df[col].isin(wanted)]
    df = df.rename(columns=dict(spec.get("paper_columns") or {}))
    for col, factor in (spec.get("paper_scale") or {}).items():
        df[col] = df[col] * factor
    return df.reset_index(drop=True)


def _key(v: Any) -> str:
    """Join keys compare as text: 120 == 120.0, 1.2 == 1.20."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer()):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


def our_rows(df: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """Our successful rows of this table, ``derived`` columns added, ``where`` applied (failed
    and missing rows are left out: the paper table shows what was measured)."""
    df = df[df["status"].eq("ok")].copy() if "status" in df else df.copy()
    for col, expr in (spec.get("derived") or {}).items():
        df[col] = df.eval(expr)
    for col, want in (spec.get("where") or {}).items():
        wanted = want if isinstance(want, list) else [want]
        df = df[df[col].map(_key).isin([_key(w) for w in wanted])]
    return df.reset_index(drop=True)


def select_best(df: pd.DataFrame, select: dict[str, Any]) -> pd.DataFrame:
    """Per group of ``select.by``, the row with the best ``select.best`` (a search table)."""
    best, by = select["best"], list(select["by"])
    df = df.dropna(subset=[best])
    pick = df.groupby(by, sort=False)[best].idxmin() if select.get("mode", "min") == "min" else \
        df.groupby(by, sort=False)[best].idxmax()
    return df.loc[pick.values].reset_index(drop=True)


def value_columns(spec: dict[str, Any]) -> list[str]:
    if spec.get("select"):
        return list(spec["select"].get("report") or []) + [spec["select"]["best"]]
    return list(spec.get("values") or {})


def index_columns(spec: dict[str, Any]) -> list[str]:
    return list(spec["select"]["by"]) if spec.get("select") else list(spec.get("index") or [])


def merge(ours: pd.DataFrame, paper: pd.DataFrame | None, spec: dict[str, Any]) -> pd.DataFrame:
    """One row per index value (the paper's rows first, in its order): each value's ours,
    ``_paper`` and ``_delta``."""
    index, values = index_columns(spec), value_columns(spec)
    for col in index:
        if col not in ours:
            ours[col] = None
    spread = [f"{v}_pm" for v in values if v in ours and f"{v}_pm" in ours]  # a speed-up's ± (bench.cost.timing)
    spread += [f"{v}{e}" for v in values if v in QUALITY_COLUMNS for e in ("_low", "_high") if f"{v}{e}" in ours]
    left = ours[index + [v for v in values if v in ours] + spread].copy()
    left["_k"] = left[index].apply(lambda r: tuple(_key(v) for v in r), axis=1)
    left = left.drop_duplicates("_k", keep="last")
    out = pd.DataFrame({"_k": list(dict.fromkeys(
        ([tuple(_key(v) for v in r) for r in paper[index].itertuples(index=False)] if paper is not None else [])
        + list(left["_k"])
    ))})
    for i, col in enumerate(index):
        out[col] = [k[i] for k in out["_k"]]
    out = out.merge(left.drop(columns=index), on="_k", how="left")
    if paper is not None:
        right = paper[index + [v for v in values if v in paper]].copy()
        right["_k"] = right[index].apply(lambda r: tuple(_key(v) for v in r), axis=1)
        right = right.drop(columns=index).drop_duplicates("_k").rename(
            columns={v: f"{v}_paper" for v in values})
        out = out.merge(right, on="_k", how="left")
    for v in values:
        if v not in out:
            out[v] = np.nan
        if f"{v}_paper" in out:
            ours_v, paper_v = pd.to_numeric(out[v], errors="coerce"), pd.to_numeric(out[f"{v}_paper"], errors="coerce")
            out[f"{v}_delta"] = ours_v - paper_v
    cols = index + [c for v in values for c in (v, f"{v}_pm", f"{v}_low", f"{v}_high", f"{v}_paper", f"{v}_delta")
                    if c in out]
    return out[cols]


def layout(merged: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """The paper's layout: with ``pivot``, that setting's values become column groups."""
    pivot = spec.get("pivot")
    if not pivot:
        return merged
    shared = spec.get("pivot_shared")
    df = merged
    if shared is not None:
        groups = [g for g in dict.fromkeys(df[pivot]) if g != _key(shared)]
        rows = df[df[pivot] == _key(shared)]
        df = pd.concat([df[df[pivot] != _key(shared)]] + [rows.assign(**{pivot: g}) for g in groups])
    index = [c for c in index_columns(spec) if c != pivot]
    order = list(dict.fromkeys(df[pivot]))
    rows = list(dict.fromkeys(tuple(r) for r in merged[index].itertuples(index=False)))
    wide = df.set_index(index + [pivot]).unstack(pivot)
    wide = wide.reindex([r[0] if len(index) == 1 else r for r in rows])
    wide.columns = [f"{g}/{c}" for c, g in wide.columns]
    wide = wide[[f"{g}/{c}" for g in order for c in merged.columns if c not in index + [pivot]
                 if f"{g}/{c}" in wide.columns]]
    return wide.reset_index()


# -------------------------------------------------------------------------------------- rendering


def notes(spec: dict[str, Any], ours: pd.DataFrame, records: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What can be compared with the paper, and what our numbers were measured on."""
    labels = dict(spec.get("values") or {})
    values = value_columns(spec)
    out = []
    comparable = [labels.get(v, v) for v in spec.get("comparable") or []]
    if comparable:
        out.append("Comparable with the paper on any machine: " + ", ".join(comparable) + ".")
    env = next((r.get("environment") for _, r in records if r.get("status") == "ok"), None) or {}
    timed = [labels.get(v, v) for v in values if v in TIMING_COLUMNS]
    if timed and env:
        method = ", ".join(sorted(set(ours.get("timing_method", pd.Series(dtype=str)).dropna().astype(str))))
        threads = sorted({t for _, r in records if (t := (r.get("timing") or {}).get("threads")) is not None})
        out.append(
            f"{', '.join(timed)}: measured on {env.get('device_name')} ({env.get('device')}, "
            f"{', '.join(map(str, threads)) or env.get('threads')} thread(s) while timing; timing {method or 'off'}; "
            "± the speed-up's 95 % interval); the paper's on one RTX 2080 -- "
            "only the speed-up ratios can be compared, and only on a GPU."
        )
    quality = [v for v in values if v in QUALITY_COLUMNS]
    protocols = sorted(set(ours["protocol"].dropna())) if "protocol" in ours else []
    paper_protocol = spec.get("paper_protocol")
    if quality and protocols and paper_protocol and protocols != [paper_protocol]:
        out.append(
            f"{', '.join(labels.get(v, v) for v in quality)}: ours use protocol {', '.join(protocols)}, the "
            f"paper's {paper_protocol}: not comparable."
        )
    models = sorted(set(ours["model"].dropna())) if "model" in ours else []
    if models:
        scored = any(c in ours and ours[c].notna().any() for c in QUALITY_COLUMNS)
        n = sorted(set(ours["num_samples"].dropna().astype(int))) if scored and "num_samples" in ours else []
        out.append(f"Ours: model {', '.join(models)}" + (f", {', '.join(map(str, n))} samples per row" if n else "")
                   + ".")
    unreliable = int((ours.get("timing_reliable") == False).sum()) if "timing_reliable" in ours else 0  # noqa: E712
    if unreliable:
        out.append(f"{unreliable} row(s) have a speed-up whose interval is wider than the precision asked for "
                   "(timing_reliable = False in the csv).")
    return out + list(spec.get("notes") or [])


def _cell(v: Any, delta: bool = False, low: Any = None, high: Any = None) -> str:
    """A value for people; with its interval (a quality metric's ``_low`` / ``_high``, metrics.bootstrap)
    as `` ±h``, h the larger distance from the value to an end of the interval."""
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    text = f"{v:+.3g}" if delta else fmt(v)
    if all(isinstance(x, (int, float)) and not math.isnan(x) for x in (low, high)):
        text += f" ±{max(high - v, v - low):.2g}"
    return text


def _spread(pm: Any) -> str:
    """`` ±x %``: a measured value's 95 % interval as its relative half-width."""
    if pm is None or isinstance(pm, str) or (isinstance(pm, float) and math.isnan(pm)):
        return ""
    return f" ±{100 * pm:.1f} %"


def _display(df: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """For people: one column per value, each cell ``ours (paper; Δ)`` where the paper has a value."""
    shown: dict[str, list[str]] = {}
    for col in df.columns:
        group, _, name = col.rpartition("/")
        if name.endswith(("_paper", "_delta", "_pm", "_low", "_high")):
            continue
        header = (f"{group} " if group else "") + labels.get(name, name)
        paper, delta, pm = f"{col}_paper", f"{col}_delta", f"{col}_pm"
        none = [None] * len(df)
        mine = [_cell(o, low=lo, high=hi) + _spread(s) for o, s, lo, hi in zip(
            df[col], df[pm] if pm in df else none, df[f"{col}_low"] if f"{col}_low" in df else none,
            df[f"{col}_high"] if f"{col}_high" in df else none)]
        if paper in df:
            shown[header] = [
                f"{o} ({_cell(p)}; {_cell(d, delta=True)})" if not (isinstance(p, float) and math.isnan(p)) else o
                for o, p, d in zip(mine, df[paper], df[delta] if delta in df else [None] * len(df))
            ]
        else:
            shown[header] = mine
    return pd.DataFrame(shown)


def to_markdown(table: pd.DataFrame, spec: dict[str, Any], note_lines: list[str]) -> str:
    labels = dict(spec.get("values") or {})
    lines = [f"### {spec.get('title') or spec['name']}", "", "Cells: ours (the paper's; ours − the paper's).", "",
             _display(table, labels).to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"- {n}" for n in note_lines]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, spec: dict[str, Any], note_lines: list[str]) -> str:
    labels = dict(spec.get("values") or {})
    shown = _display(table, labels)
    n_index = len([c for c in index_columns(spec) if c != spec.get("pivot")])
    body = shown.to_latex(index=False, escape=True, column_format="l" * n_index + "r" * (shown.shape[1] - n_index))
    caption = (spec.get("title") or spec["name"]).replace("%", r"\%")
    comments = "".join(f"% {n}\n" for n in note_lines)
    return f"% {caption}\n{comments}{body}"


def plot(ours: pd.DataFrame, paper: pd.DataFrame | None, spec: dict[str, Any], path: Path) -> Path | None:
    """The table's figures in one PNG: each plot's y against x, one line per series value."""
    plots = [p for p in spec.get("plots") or [] if p["x"] in ours and p["y"] in ours and ours[p["y"]].notna().any()
             or (paper is not None and p["x"] in paper and p["y"] in paper)]
    if not plots:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(spec.get("values") or {})
    fig, axes = plt.subplots(1, len(plots), figsize=(5.2 * len(plots), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, p in zip(axes[0], plots):
        series = list(p.get("series") or [])
        names: dict[tuple, int] = {}
        for source, df, style in (("ours", ours, "-o"), ("paper", paper, "--x")):
            if df is None or p["x"] not in df or p["y"] not in df:
                continue
            groups = df.groupby(series, sort=False) if series else [((), df)]
            for key, g in groups:
                key = key if isinstance(key, tuple) else (key,)
                g = g.dropna(subset=[p["x"], p["y"]]).sort_values(p["x"])
                if g.empty:
                    continue
                color = colors[names.setdefault(tuple(_key(k) for k in key), len(names)) % len(colors)]
                label = " ".join(_key(k) for k in key)
                label = f"{label} ({source})" if label else source
                ax.plot(g[p["x"]], g[p["y"]], style, color=color, label=label)
                low, high = f"{p['y']}_low", f"{p['y']}_high"
                if source == "ours" and low in g and high in g and g[low].notna().any():
                    # the bootstrap interval: the speed-up's (bench.cost.timing), a quality metric's (metrics.bootstrap)
                    ax.errorbar(g[p["x"]], g[p["y"]], yerr=[g[p["y"]] - g[low], g[high] - g[p["y"]]],
                                fmt="none", ecolor=color, capsize=2, alpha=0.7)
        ax.set_xlabel(labels.get(p["x"], p["x"]))
        ax.set_ylabel(labels.get(p["y"], p["y"]))
        ax.set_title(p.get("title") or f"{labels.get(p['y'], p['y'])} vs {labels.get(p['x'], p['x'])}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(spec.get("title") or spec["name"], fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def render(sweep_dir: str | Path, spec: dict[str, Any] | None = None) -> list[Path]:
    """Write ``<name>.csv/.md/.tex/.png`` into ``sweep_dir``; nothing when the sweep has no table spec."""
    sweep_dir = Path(sweep_dir)
    try:
        records = load_records(sweep_dir)
    except FileNotFoundError:  # every job missing: nothing of ours to show
        return []
    spec = spec or spec_of(records)
    if not spec:
        return []
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec
    ours = our_rows(build_table(sweep_dir), spec)
    if spec.get("select"):
        ours = select_best(ours, spec["select"])
    paper = paper_table(spec)
    table = layout(merge(ours, paper, spec), spec)
    note_lines = notes(spec, ours, records)
    name = spec["name"]
    written = [
        write_csv(table, sweep_dir / f"{name}.csv"),
        atomic_write_bytes(sweep_dir / f"{name}.md", to_markdown(table, spec, note_lines).encode()),
        atomic_write_bytes(sweep_dir / f"{name}.tex", to_latex(table, spec, note_lines).encode()),
    ]
    png = plot(ours, paper, spec, sweep_dir / f"{name}.png")
    return written + ([png] if png else [])
