"""The paper's tables from a sweep: our numbers beside the paper's, in the paper's layout.

An experiment file (``conf/experiment/tableN.yaml``) carries a ``table`` spec
(:class:`bench.run.config.TableSpec`); every run record of its sweep holds it, so the
table is rendered from the records alone -- at the end of the sweep, or at any time
with ``python -m bench.report <sweep_dir>``. Written into the sweep directory:

* ``tableN.csv``: the paper's rows and columns; for each value ours, ``<value>_paper``
  (the paper's number exactly as printed) and ``<value>_delta`` (ours minus the paper's),
  the last one empty where the two are not comparable;
* ``tableN.md`` and ``tableN.tex`` (booktabs): the same for people, each cell
  ``ours (paper; Δ)`` where comparable and ``ours (paper)`` where not, with notes saying
  why, on what our numbers were measured and where the paper contradicts itself;
* ``tableN.png``: the table's figures, naming the model, device and protocol that ran;
  the paper's line shares an axis with ours only where the two are comparable.

What is comparable (:func:`comparability`): MACs always; a speed-up only when ours was
timed on a GPU (the paper's on one RTX 2080); absolute throughput never (another GPU);
a quality metric only when our runs used the paper's protocol (the record's ``protocol``
against the spec's ``paper_protocol``). The paper's numbers are read from
``results/paper/<file>.csv`` (typed in by hand) as text, so they are shown as printed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from bench.core.resources import PACKAGE_DIR
from bench.report.table import SETTING_COLUMNS, build_table, fmt, load_records, write_csv
from metrics.files import atomic_write, atomic_write_bytes

AUX = ("_pm", "_low", "_high", "_paper", "_delta")  # the columns beside a value in a merged table
TIMING_COLUMNS = {"throughput", "throughput_baseline", "speedup", "speedup_low", "speedup_high", "speedup_pm"}
QUALITY_COLUMNS = {"fid", "sfid", "is_mean", "precision", "recall", "clip_score", "psnr", "ssim", "lpips"}
PAPER_DEVICE = "one RTX 2080"
EMPTY = "—"
CELLS = ("Cells: ours (the paper's; ours − the paper's) where the two are comparable, else ours (the paper's); "
         "the paper's numbers as printed.")
OURS_CELLS = "Cells: ours; ± a speed-up's or a quality metric's 95 % interval."


def _paper_dirs() -> list[Path]:
    """results/paper of a checkout, else the copy installed as the package ``bench.paper``."""
    dirs = [PACKAGE_DIR.parent / "results" / "paper"]
    try:
        import bench.paper

        dirs += [Path(p) for p in bench.paper.__path__]
    except ImportError:
        pass
    return dirs


def _plain_spec(spec: Any) -> dict[str, Any]:
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    if spec.get("paper_scale") and not spec.get("ours_scale"):  # records written before ours_scale
        spec["ours_scale"] = {k: 1 / f for k, f in spec["paper_scale"].items()}
    return spec


def spec_of(records: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The table spec the sweep's runs were made for (None: not a paper-table sweep)."""
    for _, rec in records:
        spec = (rec.get("settings") or {}).get("table")
        if spec:
            return spec
    return None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _key(v: Any) -> str:
    """Join keys compare as text: 120 == 120.0 == "120", 1.2 == "1.20"."""
    if _missing(v):
        return ""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, np.integer)) or float(v).is_integer():
        return str(int(v))
    return f"{float(v):.6g}"


def _where(df: pd.DataFrame, where: dict[str, Any] | None) -> pd.DataFrame:
    """Rows whose columns have one of the wanted values (compared as keys)."""
    for col, want in (where or {}).items():
        wanted = {_key(w) for w in (want if isinstance(want, list) else [want])}
        df = df[df[col].map(_key).isin(wanted)] if col in df else df.iloc[0:0]
    return df


def paper_table(spec: dict[str, Any]) -> pd.DataFrame | None:
    """The paper's rows of this table, with our column names, every cell as printed (text)."""
    if not spec.get("paper"):
        return None
    for d in _paper_dirs():
        path = d / spec["paper"]
        if path.is_file():
            break
    else:
        return None
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = _where(df, spec.get("paper_where")).rename(columns=dict(spec.get("paper_columns") or {}))
    return df.reset_index(drop=True)


def _numeric(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s.replace("", np.nan), errors="coerce")


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


def our_rows(df: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """Our successful rows of this table: ``derived`` columns added, ``where`` applied, values in
    the paper's units (``ours_scale``), speed-ups of other models against ``speedup_against``,
    and rows without any measured value left out (failed and missing rows too: the paper
    table shows what was measured)."""
    df = df[df["status"].eq("ok")].copy() if "status" in df else df.copy()
    for col, expr in (spec.get("derived") or {}).items():
        df[col] = df.eval(expr)
    df = _where(df, spec.get("where"))
    for col, factor in (spec.get("ours_scale") or {}).items():
        for c in (col, f"{col}_low", f"{col}_high"):
            if c in df:
                df[c] = pd.to_numeric(df[c], errors="coerce") * factor
    if spec.get("speedup_against") and "throughput" in df:
        df = _speedup_against(df, spec["speedup_against"], list(spec.get("speedup_within") or []))
    values = [v for v in value_columns(spec) if v in df and v not in SETTING_COLUMNS]
    if values and not spec.get("select"):
        df = df[df[values].apply(pd.to_numeric, errors="coerce").notna().any(axis=1)]
    return df.reset_index(drop=True)


def _speedup_against(df: pd.DataFrame, row: dict[str, Any], within: list[str]) -> pd.DataFrame:
    """Rows of another model than ``row``'s: speed-up = their throughput over ``row``'s (the one
    with the same ``within`` values); their own record times them against themselves."""
    ref = _where(df, row)
    other = df["model"].map(_key) != _key(row.get("model"))
    df = df.copy()
    for c in ("speedup_pm", "speedup_low", "speedup_high"):
        if c in df:
            df.loc[other, c] = np.nan
    for i in df.index[other]:
        same = ref
        for c in within:
            same = same[same[c].map(_key) == _key(df.at[i, c])]
        base = pd.to_numeric(same["throughput"], errors="coerce").dropna()
        df.at[i, "speedup"] = float(df.at[i, "throughput"]) / base.iloc[-1] if len(base) else np.nan
    return df


# ----------------------------------------------------------------------------- what compares


def _env(records: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return next((r.get("environment") for _, r in records if r.get("status", "ok") == "ok"), None) or {}


def _protocols(ours: pd.DataFrame) -> list[str]:
    return sorted(set(ours["protocol"].dropna().astype(str))) if "protocol" in ours else []


def compared_values(spec: dict[str, Any], incomparable: dict[str, str]) -> set[str]:
    """The values that get a difference: the comparable measurements (a setting shown as a
    value, e.g. Table 6's N, gets none; a search table's chosen settings do)."""
    settings = set() if spec.get("select") else set(SETTING_COLUMNS)
    return {v for v in value_columns(spec) if v not in incomparable and v not in settings}


def comparability(spec: dict[str, Any], ours: pd.DataFrame, records: list[tuple[str, dict[str, Any]]],
                  extra: list[str] | None = None) -> dict[str, str]:
    """Each value that is *not* comparable with the paper's, with the reason (said once, in the
    notes); a value not listed is compared (gets a Δ). MACs always compare; a speed-up only
    when every timed run of ours ran on a GPU; absolute throughput never (the paper's GPU is
    another); a quality metric only when our runs used ``paper_protocol``. A search table's
    reported settings (supp. Tables 9, 10) compare as its criterion does."""
    labels = dict(spec.get("values") or {})
    forced = set(spec.get("comparable") or [])
    devices = sorted({str(r.get("environment", {}).get("device", "")) for _, r in records
                      if r.get("status", "ok") == "ok" and (r.get("timing") or "throughput" in
                                                            (r.get("measurements") or {}))})
    env = _env(records)
    on = f"{env.get('device_name') or '?'} ({', '.join(devices) or env.get('device', '?')})"
    protocols, paper_protocol = _protocols(ours), spec.get("paper_protocol")
    out: dict[str, str] = {}
    for v in dict.fromkeys(value_columns(spec) + list(extra or [])):  # extra: a figure's axes
        if v in forced or v.startswith("macs") or v not in ours or not pd.to_numeric(
                ours[v], errors="coerce").notna().any():
            continue  # MACs compare; a value we did not measure has no difference to show
        if v in ("throughput", "throughput_baseline"):
            out[v] = f"ours measured on {on}, the paper's on {PAPER_DEVICE}: absolute throughput depends on the device"
        elif v in TIMING_COLUMNS:
            if not devices or not all(d.startswith("cuda") for d in devices):
                out[v] = f"ours timed on {on}, the paper's on {PAPER_DEVICE}: speed-ups compare only on a GPU"
        elif v in QUALITY_COLUMNS:
            if protocols and protocols != [paper_protocol]:
                out[v] = f"ours use protocol {', '.join(protocols)}, the paper's {paper_protocol or 'its own'}"
            elif not protocols:
                out[v] = "ours have no quality protocol recorded"
    if spec.get("select"):
        best = spec["select"]["best"]
        if best in out:
            for v in spec["select"].get("report") or []:
                out.setdefault(v, f"chosen by {labels.get(best, best)}, which is not comparable")
    return out


# ------------------------------------------------------------------------------------ layout


def _join_keys(df: pd.DataFrame, index: list[str]) -> list[tuple[str, ...]]:
    return [tuple(_key(v) for v in row) for row in df[index].itertuples(index=False)] if len(df) else []


def merge(ours: pd.DataFrame, paper: pd.DataFrame | None, index: list[str], values: list[str],
          compared: set[str] | frozenset[str] = frozenset(), label: str | None = None) -> pd.DataFrame:
    """One row per index value (the paper's rows first, in its order, then ours): each value's
    ours, ``_pm`` (a speed-up's ±), ``_low``/``_high`` (a quality metric's interval), ``_paper``
    (text, as printed) and ``_delta`` (ours minus
    the paper's for a value in ``compared``, else empty). ``label``: a column of the paper's
    rows shown as the row's name (``label``; ours-only rows are named by their keys)."""
    ours = ours.assign(**{c: None for c in index if c not in ours})
    mine: dict[tuple[str, ...], dict[str, Any]] = {}
    for k, (_, row) in zip(_join_keys(ours, index), ours.iterrows()):
        mine[k] = row.to_dict()  # the last row of a key wins
    theirs: dict[tuple[str, ...], dict[str, Any]] = {}
    if paper is not None:
        for k, (_, row) in zip(_join_keys(paper, index), paper.iterrows()):
            theirs.setdefault(k, row.to_dict())
    keys = list(dict.fromkeys(list(theirs) + list(mine)))
    out = pd.DataFrame({col: [k[i] for k in keys] for i, col in enumerate(index)})
    if label:
        out["label"] = [theirs.get(k, {}).get(label) or " ".join(x for x in k if x) for k in keys]

    def number(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return np.nan

    for v in values:
        out[v] = [number(mine.get(k, {}).get(v)) for k in keys]
        if any(f"{v}_pm" in m for m in mine.values()):
            out[f"{v}_pm"] = [number(mine.get(k, {}).get(f"{v}_pm")) for k in keys]
        if v in QUALITY_COLUMNS:  # a quality metric's 95 % interval (metrics.bootstrap)
            for end in ("_low", "_high"):
                if any(f"{v}{end}" in m for m in mine.values()):
                    out[f"{v}{end}"] = [number(mine.get(k, {}).get(f"{v}{end}")) for k in keys]
        if paper is not None and v in paper:
            out[f"{v}_paper"] = [theirs.get(k, {}).get(v) or np.nan for k in keys]
            out[f"{v}_delta"] = (out[v] - _numeric(out[f"{v}_paper"].astype(object))) if v in compared else np.nan
    return out


def _of(col: str, values: list[str]) -> bool:
    """Whether ``col`` is one of ``values`` or its ``_pm``/``_low``/``_high``/``_paper``/``_delta``."""
    return any(col == v or col in (f"{v}{s}" for s in AUX) for v in values)


def _pivot(merged: pd.DataFrame, keys: list[str], pivot: str, group_values: dict[str, list[str]]) -> pd.DataFrame:
    """``pivot``'s values become column groups ``<group>/<column>`` (``group_values``: the values
    of a group, default all); rows are the other keys."""
    rows = list(dict.fromkeys(tuple(r) for r in merged[keys].itertuples(index=False)))
    out = pd.DataFrame({k: [r[i] for r in rows] for i, k in enumerate(keys)})
    for g in dict.fromkeys(merged[pivot]):
        wanted = group_values.get(g)
        cols = [c for c in merged.columns if c not in keys + [pivot]
                and (wanted is None or c == "label" or _of(c, list(wanted)))]
        part = merged[merged[pivot] == g]
        by_key = {tuple(r): i for r, i in zip(part[keys].itertuples(index=False), part.index)}
        for c in cols:
            out[f"{g}/{c}"] = [part.at[by_key[r], c] if r in by_key else np.nan for r in rows]
    return out


def panels_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's panels; a table without ``panels`` is one unnamed panel."""
    values = value_columns(spec)
    if spec.get("panels"):
        return [{**p, "values": list(p.get("values") or values)} for p in spec["panels"]]
    return [{"name": None, "index": index_columns(spec), "show": spec.get("show"), "label": spec.get("label"),
             "values": values, "pivot": spec.get("pivot"), "pivot_values": dict(spec.get("pivot_values") or {})}]


def layout(ours: pd.DataFrame, paper: pd.DataFrame | None, spec: dict[str, Any],
           compared: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """The paper's layout: each panel merged on its own keys (pivoted where it says so), the
    panels side by side row by row."""
    parts = []
    for panel in panels_of(spec):
        index, pivot = list(panel["index"]), panel.get("pivot")
        mine = _where(ours, panel.get("where"))
        theirs = _where(paper, panel.get("paper_where")) if paper is not None else None
        merged = merge(mine, theirs, index, panel["values"], compared, panel.get("label"))
        keys = [c for c in index if c != pivot]
        show = list(panel.get("show") if panel.get("show") is not None else keys)
        if pivot:
            names = None
            if "label" in merged:  # one name per row: the first group's that has one
                first = merged.drop_duplicates(keys)
                names = dict(zip(first[keys].itertuples(index=False), first["label"]))
                merged = merged.drop(columns="label")
            merged = _pivot(merged, keys, pivot, dict(panel.get("pivot_values") or {}))
            if names is not None:
                merged.insert(len(keys), "label", [names.get(tuple(r)) for r in merged[keys].itertuples(index=False)])
        front = show + (["label"] if "label" in merged else [])
        rest = [c for c in merged.columns if c not in keys + ["label"]]
        part = merged[front + rest].reset_index(drop=True)
        if panel.get("name"):
            part.columns = [f"{panel['name']}/{c}" for c in part.columns]
        parts.append(part)
    return pd.concat(parts, axis=1) if len(parts) > 1 else parts[0]


# -------------------------------------------------------------------------------------- notes


def _defaults(records: list[tuple[str, dict[str, Any]]]) -> set[tuple[str, str]]:
    """The models' default (c, p) (``model.nonuniform_default``), as formatted."""
    out = set()
    for _, r in records:
        d = (((r.get("settings") or {}).get("model") or {}).get("nonuniform_default")) or {}
        if d.get("center") is not None:
            out.add((fmt(d["center"]), fmt(d.get("power"))))
    return out


def _nonuniform_note(ours: pd.DataFrame, defaults: set[tuple[str, str]] = frozenset()) -> str | None:
    """The (c, p) our non-uniform rows ran with, per N (Table 9 / 10 / the model's default)."""
    if "schedule" not in ours or "center" not in ours:
        return None
    nu = ours[ours["schedule"].astype(str).eq("nonuniform")]
    if nu.empty:
        return None
    pairs = {}
    for _, r in nu.iterrows():
        pairs.setdefault(fmt(r.get("interval")), set()).add((fmt(r.get("center")), fmt(r.get("power"))))
    distinct = {cp for s in pairs.values() for cp in s}
    if len(distinct) == 1 and len(pairs) > 1:
        c, p = next(iter(distinct))
        whose = " (the model's default, its conf/model/*.yaml)" if (c, p) in defaults else ""
        return f"Our non-uniform rows ran with c = {c}, p = {p} at every N{whose}."
    per = "; ".join(f"N = {n}: " + ", ".join(f"c = {c}, p = {p}" for c, p in sorted(s)) for n, s in pairs.items())
    return f"Our non-uniform rows ran with {per}."


def _below_one_note(ours: pd.DataFrame, spec: dict[str, Any]) -> list[str]:
    """Every speed-up of ours below 1: within its interval, or what MACs do not explain."""
    if "speedup" not in ours:
        return []
    out = []
    index = [c for c in index_columns(spec) if c in ours and c != "schedule"]
    for _, r in ours[pd.to_numeric(ours["speedup"], errors="coerce") < 1].iterrows():
        what = ", ".join(f"{c} {fmt(r[c])}" for c in index) or "a row"
        low, high = r.get("speedup_low"), r.get("speedup_high")
        line = f"Speed below 1 at {what}: {fmt(r['speedup'])}"
        if not _missing(low) and not _missing(high):
            line += f" (95 % interval {fmt(low)}–{fmt(high)})"
            if high >= 1:
                out.append(line + ": 1 is within the interval, so this is no slow-down.")
                continue
        pred = r.get("macs_predicted_speedup")
        if not _missing(pred):
            line += (f". The MACs predict {fmt(pred)}, a saving of {100 * (1 - 1 / pred):.1f} % per run; on this "
                     "device the time MACs do not count (the engine's per-call work: truncated forward, storing the "
                     "feature; memory traffic) outweighs it.")
        out.append(line if line.endswith(".") else line + ".")
    return out


def _shared_weights_note(ours: pd.DataFrame, records: list[tuple[str, dict[str, Any]]]) -> str | None:
    """Rows of different models that ran with the same weights (a command-line
    ``model.pretrained`` applies to every row of a sweep)."""
    by_print: dict[str, set[str]] = {}
    for _, r in records:
        fp, name = r.get("weights_fingerprint"), ((r.get("settings") or {}).get("model") or {}).get("name")
        if fp and name and r.get("status", "ok") == "ok":
            by_print.setdefault(fp, set()).add(name)
    same = [sorted(s) for s in by_print.values() if len(s) > 1]
    if not same:
        return None
    return ("Warning: " + "; ".join(", ".join(s) for s in same) + " ran with the same weights (a model.pretrained "
            "on the command line applies to every row): their rows are one model's.")


def notes(spec: dict[str, Any], ours: pd.DataFrame, records: list[tuple[str, dict[str, Any]]],
          incomparable: dict[str, str] | None = None) -> list[str]:
    """What can be compared with the paper and why not the rest, and what ours were measured on."""
    labels = dict(spec.get("values") or {})
    values = value_columns(spec)
    incomparable = comparability(spec, ours, records) if incomparable is None else incomparable
    out = []
    comparable = [labels.get(v, v) for v in values if v not in incomparable and (
        v.startswith("macs") or v in (spec.get("comparable") or []))]
    if not (spec.get("paper") or spec.get("paper_protocol")):  # ours alone (experiment=methods): nothing to compare
        comparable, incomparable = [], {}
    if comparable:
        out.append("Comparable with the paper on any machine: " + ", ".join(comparable) + ".")
    reasons: dict[str, list[str]] = {}
    for v in values:
        if v in incomparable:
            reasons.setdefault(incomparable[v], []).append(labels.get(v, v))
    for why, cols in reasons.items():
        out.append(f"{', '.join(cols)}: not comparable, the paper's value is shown without a difference ({why}).")
    env = _env(records)
    timed = [labels.get(v, v) for v in values if v in TIMING_COLUMNS]
    if timed and env and any(c in ours and ours[c].notna().any() for c in ("throughput", "speedup")):
        method = ", ".join(sorted(set(ours.get("timing_method", pd.Series(dtype=str)).dropna().astype(str))))
        threads = sorted({t for _, r in records if (t := (r.get("timing") or {}).get("threads")) is not None})
        out.append(
            f"{', '.join(timed)}: ours timed on {env.get('device_name')} ({env.get('device')}, "
            f"{', '.join(map(str, threads)) or env.get('threads')} thread(s) while timing; timing {method or 'off'}; "
            "± the speed-up's 95 % interval)."
        )
    scaled = [labels.get(c, c) for c in (spec.get("ours_scale") or {}) if c in values]
    if scaled:
        out.append(f"{', '.join(scaled)} in percent, the paper's unit (ours converted from fractions).")
    models = sorted(set(ours["model"].dropna().astype(str))) if "model" in ours else []
    if models:
        scored = any(c in ours and ours[c].notna().any() for c in QUALITY_COLUMNS)
        n = sorted(set(ours["num_samples"].dropna().astype(int))) if scored and "num_samples" in ours else []
        protocols = _protocols(ours) if scored else []
        branches = sorted(set(ours.loc[ours["schedule"].astype(str).ne("none"), "branch"].dropna().astype(int))) \
            if "branch" in ours and "schedule" in ours and "branch" not in index_columns(spec) else []
        random = "weights" in ours and ours["weights"].astype(str).eq("random").all()
        out.append(f"Ours: model {', '.join(models)}" + (" (random weights: cost only)" if random else "")
                   + (f", branch {', '.join(map(str, branches))}" if branches else "")
                   + (f", {', '.join(map(str, n))} samples per row" if n else "")
                   + (f", quality protocol {', '.join(protocols)}" if protocols else "") + ".")
    against = spec.get("speedup_against")
    if against and "speedup" in ours and ours["speedup"].notna().any():
        row = ", ".join(f"{k} {v}" for k, v in against.items() if k != "model")
        within = ", ".join(spec.get("speedup_within") or [])
        out.append(f"Speed of other models than {against.get('model')}: their throughput over that of "
                   f"{against.get('model')}'s row with {row}" + (f" (the same {within})" if within else "")
                   + ", timed in separate jobs; the other rows' speed-ups are paired measurements.")
    if not {"center", "power"} & set(index_columns(spec)) and (line := _nonuniform_note(ours, _defaults(records))) is not None:
        out.append(line)
    out += _below_one_note(ours, spec)
    timed_speed = "timing_reliable" in ours and "speedup" in values
    unreliable = int(ours["timing_reliable"].eq(False).sum()) if timed_speed else 0
    if unreliable:
        out.append(f"{unreliable} row(s) have a speed-up whose interval is wider than the precision asked for "
                   "(timing_reliable = False in the csv).")
    if (line := _shared_weights_note(ours, records)) is not None:
        out.append(line)
    return out + list(spec.get("notes") or [])


# ---------------------------------------------------------------------------------- rendering


def cell(ours: Any, paper: Any = None, delta: Any = None, pm: Any = None, low: Any = None,
         high: Any = None) -> str:
    """One cell for people -- the one place a cell is formatted: ours (with a speed-up's
    ``±x %``, its 95 % interval's relative half-width, or a quality metric's ``±h``, h the
    larger distance from the value to an end of its 95 % interval), then the paper's number
    exactly as printed and, where the two are comparable, ours minus the paper's:
    ``ours (paper; Δ)``, ``ours (paper)`` or ``ours``."""
    if isinstance(ours, str):
        mine = ours
    else:
        mine = EMPTY if _missing(ours) else fmt(ours)
        if not _missing(pm) and not isinstance(pm, str):
            mine += f" ±{100 * pm:.1f} %"
        elif not any(_missing(x) or isinstance(x, str) for x in (ours, low, high)):
            mine += f" ±{max(high - ours, ours - low):.2g}"
    if _missing(paper):
        return mine
    if _missing(delta):
        return f"{mine} ({paper})"
    return f"{mine} ({paper}; {delta:+.3g})"


def _heading(col: str, spec: dict[str, Any]) -> str:
    """``panel/group/name`` -> "Panel Group Name" (``groups``, ``labels``, ``values``)."""
    *groups, name = col.split("/")
    groups_ = dict(spec.get("groups") or {})
    titles = {p["name"]: p.get("title") or p["name"] for p in spec.get("panels") or []}
    words = [titles.get(g) or groups_.get(g) or g for g in groups]
    names = {**dict(spec.get("labels") or {}), **dict(spec.get("values") or {})}
    name_ = names.get(name, "Row" if name == "label" and not groups else "" if name == "label" else name)
    return " ".join(w for w in words + [name_] if w)


def _display(df: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """For people: one column per value, each cell from :func:`cell`."""
    shown: dict[str, list[str]] = {}
    values = set(value_columns(spec))
    for col in df.columns:
        name = col.rpartition("/")[2]
        if name.endswith(AUX):
            continue
        header = _heading(col, spec)
        if name not in values:  # a key or the row's name
            shown[header] = [EMPTY if _missing(v) else str(v) for v in df[col]]
            continue
        n = len(df)
        paper = df[f"{col}_paper"] if f"{col}_paper" in df else [None] * n
        delta = df[f"{col}_delta"] if f"{col}_delta" in df else [None] * n
        pm = df[f"{col}_pm"] if f"{col}_pm" in df else [None] * n
        low = df[f"{col}_low"] if f"{col}_low" in df else [None] * n
        high = df[f"{col}_high"] if f"{col}_high" in df else [None] * n
        shown[header] = [cell(o, p, d, s, lo, hi) for o, p, d, s, lo, hi in zip(df[col], paper, delta, pm, low, high)]
    return pd.DataFrame(shown)


def to_markdown(table: pd.DataFrame, spec: dict[str, Any], note_lines: list[str]) -> str:
    cells = CELLS if any(str(c).endswith("_paper") for c in table.columns) else OURS_CELLS
    lines = [f"### {spec.get('title') or spec['name']}", "", cells, "",
             _display(table, spec).to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"- {n}" for n in note_lines]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, spec: dict[str, Any], note_lines: list[str]) -> str:
    shown = _display(table, spec)
    values = set(value_columns(spec))
    align = "".join("r" if c.rpartition("/")[2] in values else "l" for c in table.columns
                    if not c.rpartition("/")[2].endswith(AUX))
    body = shown.to_latex(index=False, escape=True, column_format=align)
    caption = (spec.get("title") or spec["name"]).replace("%", r"\%")
    comments = "".join(f"% {n}\n" for n in note_lines)
    return f"% {caption}\n{comments}{body}"


# ------------------------------------------------------------------------------------ figures


def _ours_caption(ours: pd.DataFrame, records: list[tuple[str, dict[str, Any]]]) -> str:
    """What ran: model, sampler and steps, device, quality protocol."""
    models = ", ".join(sorted(set(ours["model"].dropna().astype(str)))) if "model" in ours else "?"
    runs = [f"{a}-{fmt(b)}" for a, b in sorted({(r["sampler"], float(r["steps"])) for _, r in ours.iterrows()
                                                   if not _missing(r.get("sampler")) and not _missing(r.get("steps"))})]
    env = _env(records)
    protocols = _protocols(ours)
    return (f"ours: {models}" + (f", {'/'.join(runs)}" if runs else "")
            + (f"; on {env.get('device_name')} ({env.get('device')})" if env else "")
            + (f"; quality protocol {', '.join(protocols)}" if protocols else ""))


def plot(ours: pd.DataFrame, paper: pd.DataFrame | None, spec: dict[str, Any], path: Path,
         records: list[tuple[str, dict[str, Any]]] | None = None,
         incomparable: dict[str, str] | None = None) -> Path | None:
    """The table's figures in one PNG: each plot's y against x, one line per series value.
    Ours and the paper's share an axis only where both quantities are comparable; otherwise
    the paper's curve gets its own panel. The title says what ran, on which device, with
    which quality protocol."""
    records, incomparable = records or [], incomparable or {}
    paper_num = None
    if paper is not None:
        paper_num = paper.copy()
        for c in paper_num.columns:
            num = _numeric(paper_num[c])
            if num.notna().sum() == (paper_num[c] != "").sum() and num.notna().any():
                paper_num[c] = num

    def has(df, p):
        return df is not None and p["x"] in df and p["y"] in df and \
            pd.to_numeric(df[p["y"]], errors="coerce").notna().any()

    axes_plan = []  # (plot, [(source, frame, style)])
    for p in spec.get("plots") or []:
        ours_p = _where(ours, p.get("where")) if ours is not None else None
        mine, theirs = has(ours_p, p), has(paper_num, p) and not p.get("where")
        if not (mine or theirs):
            continue
        shared = p["x"] not in incomparable and p["y"] not in incomparable
        if mine and theirs and shared:
            axes_plan.append((p, [("ours", ours_p, "-o"), ("paper", paper_num, "--x")]))
        else:
            if mine:
                axes_plan.append((p, [("ours", ours_p, "-o")]))
            if theirs:
                axes_plan.append((p, [("paper", paper_num, "--x")]))
    if not axes_plan:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"speedup": "Speed", "macs_g": "MACs (G)", "fid": "FID", "clip_score": "CLIP score",
              **dict(spec.get("labels") or {}), **dict(spec.get("values") or {})}
    env = _env(records)
    group_names = dict(spec.get("groups") or {})

    def axis(col: str, only: set[str]) -> str:
        """An axis's label; a timing axis of ours alone says on what ours was timed."""
        text = labels.get(col, col)
        if col in TIMING_COLUMNS and only == {"ours"} and env:
            text += f" (ours, on {env.get('device')})"
        elif col in TIMING_COLUMNS and only == {"paper"}:
            text += f" (the paper's, on {PAPER_DEVICE})"
        return text

    ncols = min(3, len(axes_plan))
    nrows = math.ceil(len(axes_plan) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows + 0.4), squeeze=False)
    for ax in axes.flat[len(axes_plan):]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names: dict[tuple, int] = {}  # a series keeps its colour in every panel
    for ax, (p, sources) in zip(axes.flat, axes_plan):
        series = list(p.get("series") or [])
        for source, df, style in sources:
            df = df.copy()
            for c in (p["x"], p["y"]):
                df[c] = pd.to_numeric(df[c], errors="coerce")
            groups = df.groupby([df[s].map(_key) for s in series], sort=False) if series and all(
                s in df for s in series) else [((), df)]
            for key, g in groups:
                key = key if isinstance(key, tuple) else (key,)
                g = g.dropna(subset=[p["x"], p["y"]]).sort_values(p["x"])
                if g.empty:
                    continue
                color = colors[names.setdefault(tuple(key), len(names)) % len(colors)]
                label = " ".join(str(group_names.get(k, k)) for k in key)
                label = f"{label} ({source})" if label else source
                ax.plot(g[p["x"]], g[p["y"]], style, color=color, label=label)
                low, high = f"{p['y']}_low", f"{p['y']}_high"
                if source == "ours" and low in g and high in g and g[low].notna().any():
                    # the 95 % interval: a speed-up's (bench.cost.timing), a quality metric's (metrics.bootstrap)
                    ax.errorbar(g[p["x"]], g[p["y"]], yerr=[g[p["y"]] - g[low], g[high] - g[p["y"]]],
                                fmt="none", ecolor=color, capsize=2, alpha=0.7)
        if p.get("front"):
            ours_p = next(df for source, df, _ in sources if source == "ours")
            xs, ys = pareto_front(pd.to_numeric(ours_p[p["x"]], errors="coerce"),
                                  pd.to_numeric(ours_p[p["y"]], errors="coerce"), p["front"])
            if len(xs) > 1:
                ax.plot(xs, ys, ":", color="grey", linewidth=2.5, alpha=0.6, label="Pareto front", zorder=0)
        only = {s for s, _, _ in sources}
        what = f"{labels.get(p['y'], p['y'])} vs {labels.get(p['x'], p['x'])}"
        if p.get("where"):
            what += " (" + ", ".join(f"{v}" for v in p["where"].values()) + ")"
        title = p.get("title") or what
        if only == {"paper"}:
            title += "\nthe paper's (its model, protocol and GPU)"
        elif only == {"ours"} and has(paper_num, p):
            title += "\nours only (not comparable with the paper's: next panel)"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(axis(p["x"], only))
        ax.set_ylabel(axis(p["y"], only))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = spec.get("title") or spec["name"]
    fig.suptitle(f"{_ours_caption(ours, records)}\n{'paper: ' if spec.get('paper') else ''}{title}", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def pareto_front(x: pd.Series, y: pd.Series, better: str) -> tuple[list[float], list[float]]:
    """The points no other point beats on both axes -- a larger ``x`` (a speed-up) and a ``y``
    that is lower (``better="min"``: FID, LPIPS) or higher (``"max"``: PSNR, SSIM) -- in
    increasing ``x``."""
    if better not in ("min", "max"):
        raise ValueError(f"plots[].front={better!r} is not one of min, max")
    sign = 1.0 if better == "min" else -1.0
    points = sorted(((float(a), sign * float(b)) for a, b in zip(x, y) if pd.notna(a) and pd.notna(b)),
                    key=lambda t: (-t[0], t[1]))
    front, best = [], math.inf
    for a, b in points:  # from the fastest down: keep a point better than every faster one
        if b < best:
            front.append((a, b))
            best = b
    front.reverse()
    return [a for a, _ in front], [sign * b for _, b in front]


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
    spec = _plain_spec(spec)
    ours = our_rows(build_table(sweep_dir), spec)
    if spec.get("select"):
        ours = select_best(ours, spec["select"])
    paper = paper_table(spec)
    incomparable = comparability(spec, ours, records, [a for p in spec.get("plots") or [] for a in (p["x"], p["y"])])
    compared = compared_values(spec, incomparable)
    table = layout(ours, paper, spec, compared)
    note_lines = notes(spec, ours, records, incomparable)
    name = spec["name"]
    written = [
        write_csv(table, sweep_dir / f"{name}.csv"),
        atomic_write_bytes(sweep_dir / f"{name}.md", to_markdown(table, spec, note_lines).encode()),
        atomic_write_bytes(sweep_dir / f"{name}.tex", to_latex(table, spec, note_lines).encode()),
    ]
    png = plot(ours, paper, spec, sweep_dir / f"{name}.png", records, incomparable)
    return written + ([png] if png else [])
