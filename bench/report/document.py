"""Finished sweeps as one document: ``report.md`` and ``report.tex`` (+ the figures) for an appendix.

``python -m bench.report <sweep_dir> [<sweep_dir> ...] --out <dir>`` (:mod:`bench.report.__main__`)
rebuilds each sweep's tables (:func:`bench.report.sweep.write_tables`: ``table.csv`` and,
for a paper-table experiment, ``tableN.{csv,md,tex,png}``, :func:`bench.report.paper.render`)
and writes into ``<dir>``:

* ``report.md`` and ``report.tex`` -- the same document: a summary of what to trust
  (unreliable timings, failed and missing jobs, columns not comparable with the paper,
  the paper's inconsistencies the tables touch, records of different commits or record
  versions), then per sweep its table in the paper's layout (a plain sweep: the columns
  of ``table.csv`` that say something), its figure, the command that reruns it, its
  samples, seeds, protocol, reference statistics (description and content hash) and
  compute, and a provenance section (commit, package versions, device, dtype, threads,
  dates) -- all from the records (:mod:`bench.report.provenance`);
* the figures, copied beside them (``s<k>-tableN.png``).

``report.tex`` is a standalone LaTeX document (booktabs, graphicx, longtable; pdflatex):
every text taken from the records is escaped (:func:`latex_escape`), and characters outside
what the LaTeX kernel's UTF-8 input handles are declared in the preamble
(:func:`unicode_declarations`).
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from bench.report.jobs import PlannedJob, planned_jobs
from bench.report.provenance import Command, Provenance, Records, mixed, provenance, sweep_command
from bench.report.records import git_commit
from bench.report.sweep import SweepTables, write_tables
from bench.report.table import DEEPCACHE, NO_CACHE, SETTING_COLUMNS, fmt, load_records
from metrics.files import atomic_write_bytes

MD_NAME = "report.md"
TEX_NAME = "report.tex"

# a plain sweep's measurement columns shown in the document, with their headers (table.csv has them all)
SHOWN = {
    "macs_g": "MACs (G)", "throughput": "Throughput (img/s)", "speedup": "Speed-up", "fid": "FID",
    "sfid": "sFID", "is_mean": "IS", "precision": "Precision", "recall": "Recall", "clip_score": "CLIP score",
    "psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS",
}
# always shown (where the table has them): they say which row is which
ROW_KEYS = ("schedule", "interval", "branch", "method", "setting")


@dataclass
class Part:
    """One sweep of the document: its table, figure, command and provenance."""

    label: str  # S1, S2, ...
    sweep_dir: Path
    tables: SweepTables
    records: Records
    planned: list[PlannedJob]
    spec: dict[str, Any] | None  # the paper table's spec (None: a plain sweep)
    command: Command
    prov: Provenance
    md_table: str = ""  # the paper table as rendered (markdown, without its heading)
    tex_table: str = ""  # the paper table as rendered (LaTeX, without its comments)
    notes: list[str] = field(default_factory=list)  # the rendered table's notes
    figure: Path | None = None

    @property
    def name(self) -> str:
        return self.spec["name"] if self.spec else "table"

    @property
    def title(self) -> str:
        if self.spec:
            return str(self.spec.get("title") or self.spec["name"])
        return f"sweep {self.sweep_dir.name}" + (f" ({self._what()})" if self._what() else "")

    def _what(self) -> str:
        df = self.tables.table
        bits = []
        for col in ("model", "sampler"):
            if col in df and df[col].nunique() == 1:
                bits.append(str(df[col].iloc[0]))
        if "steps" in df and df["steps"].nunique() == 1:
            bits.append(f"{fmt(df['steps'].iloc[0])} steps")
        return ", ".join(bits)

    @property
    def figure_name(self) -> str | None:
        return f"{self.label.lower()}-{self.name}.png" if self.figure else None


def collect(sweep_dirs: list[str | Path]) -> list[Part]:
    """Rebuild each sweep's tables and gather what the document says of it."""
    parts = []
    for k, d in enumerate(sweep_dirs, 1):
        d = Path(d)
        tables = write_tables(d)
        try:
            records = load_records(d)
        except FileNotFoundError:  # every job missing
            records = []
        planned = planned_jobs(d)
        spec = next((s for _, r in records if (s := (r.get("settings") or {}).get("table"))), None)
        part = Part(f"S{k}", d, tables, records, planned, spec, sweep_command(d, records, planned),
                    provenance(records, len(planned)))
        rendered = {p.suffix: p for p in tables.paper}
        if spec and ".md" in rendered:
            md = rendered[".md"].read_text()
            part.md_table = _strip_heading(md)
            part.notes = rendered_notes(md)
        if spec and ".tex" in rendered:
            part.tex_table = "\n".join(l for l in rendered[".tex"].read_text().splitlines()
                                       if not l.startswith("%")).strip()
        if ".png" in rendered:
            part.figure = rendered[".png"]
        parts.append(part)
    return parts


def _strip_heading(md: str) -> str:
    lines = md.strip().splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines)


def rendered_notes(md: str) -> list[str]:
    """The notes of a rendered paper table (``tableN.md``): its bullet lines after the table."""
    lines = md.splitlines()
    last_row = max((i for i, l in enumerate(lines) if l.startswith("|")), default=-1)
    return [l[2:].strip() for l in lines[last_row + 1:] if l.startswith("- ")]


# --------------------------------------------------------------------------------------- trust


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def row_label(row: dict[str, Any]) -> str:
    """Which row: its job and the settings that tell it from the others."""
    row = {k: _clean(v) for k, v in row.items()}
    bits = [f"job {row.get('job')}"]
    if row.get("method") not in (None, DEEPCACHE, NO_CACHE):
        bits.append(str(row.get("setting") or row["method"]))
    elif row.get("schedule") == "none":
        bits.append("no cache")
    elif row.get("schedule") is not None:
        what = f"{row['schedule']} N={fmt(row.get('interval'))}"
        if row.get("branch") is not None:
            what += f" branch {fmt(row['branch'])}"
        if row.get("center") is not None:
            what += f" c={fmt(row['center'])} p={fmt(row.get('power'))}"
        bits.append(what)
    if row.get("steps") is not None:
        bits.append(f"{fmt(row['steps'])} steps")
    return ", ".join(bits)


@dataclass
class Trust:
    """What a reader must know before trusting the numbers: (section, lines) in order."""

    mixed: list[str]  # across the whole report
    items: list[tuple[str, list[str]]]


def trust(parts: list[Part]) -> Trust:
    all_records = [(f"{p.label}/{j}", r) for p in parts for j, r in p.records]
    unreliable, failed, missing, comparable, inconsistent, other = [], [], [], [], [], []
    for p in parts:
        df = p.tables.table
        rows = [dict(r) for _, r in df.iterrows()]
        for r in rows:
            if r.get("status") == "ok" and _clean(r.get("timing_reliable")) is False:
                pm = _clean(r.get("speedup_pm"))
                spread = f" ±{100 * pm:.1f} %" if pm is not None else ""
                unreliable.append(f"{p.label} {p.name}: {row_label(r)}: speed-up {fmt(_clean(r.get('speedup')))}"
                                  f"{spread}, wider than the precision asked for (run.timing_precision)")
            elif r.get("status") == "failed":
                failed.append(f"{p.label} {p.name}: {row_label(r)}: {r.get('error')}")
        if p.tables.missing:
            missing.append(f"{p.label} {p.name}: job {', '.join(p.tables.missing)} left no run.json (killed, "
                           "lost or never started); rerunning the command with the sweep's own hydra.sweep.dir "
                           "finishes them")
        if p.spec:
            labels = dict(p.spec.get("values") or {})
            ok = [labels.get(v, v) for v in p.spec.get("comparable") or []]
            values = [v for v in labels if v not in (p.spec.get("comparable") or [])]
            if values:
                named = [labels[v] for v in values]
                why = [n for n in p.notes if any(lbl in n for lbl in named)]
                comparable.append(f"{p.label} {p.name}: {', '.join(named)} (comparable on any machine: "
                                  f"{', '.join(ok) or 'none'})" + (". The table's notes: " + " ".join(why)
                                                                    if why else ""))
            inconsistent += [f"{p.label} {p.name}: {n}" for n in p.notes if "§6" in n]
        for line in mixed(p.records):
            other.append(f"{p.label} {p.name}: {line}")
        if p.prov.dirty:
            other.append(f"{p.label} {p.name}: made from a tree with uncommitted changes "
                         f"({', '.join(c for c in p.prov.commits if c.endswith('-dirty'))}): no checkout restores it")
        if p.prov.timing_warnings:
            other.append(f"{p.label} {p.name}: {p.prov.timing_warnings} of {p.prov.ok} run(s) warned while timing "
                         "(e.g. other processes used the CPUs): their speed-ups were measured on a busy machine")
        if len(p.prov.reference_hashes) > 1:
            other.append(f"{p.label} {p.name}: quality against {len(p.prov.reference_hashes)} different reference "
                         "contents (" + ", ".join(h[:12] for h in p.prov.reference_hashes) + ")")
        if p.prov.quality_scored and not p.prov.reference_hashes:
            other.append(f"{p.label} {p.name}: the records do not carry the reference's content hash (made before "
                         "the harness recorded it)")
        other += [f"{p.label} {p.name}: {n}" for n in p.command.notes]
    items = [
        ("Timing flagged unreliable", unreliable),
        ("Failed jobs", failed),
        ("Missing jobs", missing),
        ("Not comparable with the paper", comparable),
        ("The paper's inconsistencies these tables touch (docs/conventions.md §6)", inconsistent),
        ("Other", other),
    ]
    return Trust(mixed(all_records), items)


# ---------------------------------------------------------------------------------------- facts


def _values(vals: list[Any], none: str = "not recorded") -> str:
    return ", ".join(str(v) for v in vals) if vals else none


def _hours(h: float) -> str:
    return f"{h:.3g}" if h >= 0.001 else f"{h:.2g}"


def _wall(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def table_facts(p: Part) -> list[tuple[str, str]]:
    """The per-table lines: jobs, samples, seeds, protocol, reference, compute, data."""
    v = p.prov
    jobs = f"{v.jobs} ({v.ok} ok"
    jobs += (f", {v.failed} failed" if v.failed else "") + (f", {len(p.tables.missing)} missing" if p.tables.missing
                                                           else "") + ")"
    if v.num_samples:
        samples = _values(v.num_samples) + " per row"
    elif v.modes and set(v.modes) <= {"cost"}:
        samples = "no images (run.mode=cost: MACs and timing only)"
    else:
        samples = "not recorded"
    if v.reference_hashes:
        ref_hash = ", ".join(f"sha256 {h}" for h in v.reference_hashes)
    else:
        ref_hash = "content hash not recorded" if v.quality_scored else ""
    reference = "; ".join(x for x in (_values(v.references, ""), ref_hash) if x) or "none (no quality measured)"
    rows = [
        ("sweep", str(p.sweep_dir)),
        ("jobs", jobs),
        ("mode", _values(v.modes)),
        ("models", _values(v.models)),
        ("samples", samples),
        ("seeds", _values(v.seeds)),
        ("protocol", _values(v.protocols, "none (no quality measured)")),
        ("reference statistics", reference),
        ("compute", f"{_wall(v.compute.wall_s)} wall, {_hours(v.compute.hours)} {v.compute.unit}"),
        ("data", str(p.tables.path) + "".join(f", {x}" for x in p.tables.paper if x.suffix == ".csv")),
    ]
    return rows


def provenance_rows(parts: list[Part]) -> list[tuple[str, str]]:
    """field -> value (one value when every sweep shares it, else per sweep)."""

    def per_sweep(get) -> str:
        vals = [(p.label, get(p)) for p in parts]
        distinct = list(dict.fromkeys(v for _, v in vals))
        if len(distinct) == 1:
            return distinct[0]
        return "; ".join(f"{label}: {v}" for label, v in vals)

    def commit(p: Part) -> str:
        out = _values(p.prov.commits)
        return out + (" (dirty: uncommitted changes)" if p.prov.dirty else "")

    rows = [
        ("git commit", per_sweep(commit)),
        ("record version", per_sweep(lambda p: _values(p.prov.record_versions))),
        ("python", per_sweep(lambda p: _values(p.prov.python))),
    ]
    names = list(dict.fromkeys(n for p in parts for n in p.prov.packages))
    for name in names:
        rows.append((name, per_sweep(lambda p, n=name: _values(p.prov.packages.get(n, [])))))
    rows += [
        ("device", per_sweep(lambda p: _values(p.prov.devices) + (f" ({_values(p.prov.device_names)})"
                                                                   if p.prov.device_names else ""))),
        ("processes per run", per_sweep(lambda p: _values(p.prov.world_sizes))),
        ("dtype", per_sweep(lambda p: _values(p.prov.dtypes))),
        ("threads", per_sweep(lambda p: _values(p.prov.threads))),
        ("threads while timing", per_sweep(lambda p: _values(p.prov.timing_threads, "no timing"))),
        ("dates (UTC)", per_sweep(lambda p: " to ".join(dict.fromkeys(p.prov.dates)) if p.prov.dates
                                  else "not recorded")),
    ]
    totals: dict[str, float] = {}
    for p in parts:
        totals[p.prov.compute.unit] = totals.get(p.prov.compute.unit, 0.0) + p.prov.compute.hours
    rows.append(("compute", "; ".join(f"{p.label}: {_wall(p.prov.compute.wall_s)} wall, "
                                      f"{_hours(p.prov.compute.hours)} {p.prov.compute.unit}" for p in parts)
                 + " (total " + ", ".join(f"{_hours(h)} {u}" for u, h in totals.items()) + ")"))
    return rows


# ------------------------------------------------------------------------------- a plain table


def plain_table(df: pd.DataFrame) -> pd.DataFrame:
    """A plain sweep's ``table.csv`` for people: the settings that differ between rows (and
    schedule, interval, branch), the headline measurements, and the status when not all ok."""
    keep = [c for c in SETTING_COLUMNS if c in df and (c in ROW_KEYS or df[c].nunique(dropna=False) > 1)]
    shown: dict[str, list[str]] = {c: [fmt(_clean(x)) for x in df[c]] for c in keep}
    for col, header in SHOWN.items():
        if col not in df or df[col].isna().all():
            continue
        cells = []
        for _, r in df.iterrows():
            x, pm = _clean(r.get(col)), _clean(r.get(f"{col}_pm"))
            cell = fmt(x)
            if x is not None and pm is not None:
                cell += f" ±{100 * pm:.1f} %"
            if col == "speedup" and x is not None and _clean(r.get("timing_reliable")) is False:
                cell += " (unreliable)"
            cells.append(cell)
        shown[header] = cells
    if "status" in df and not df["status"].eq("ok").all():
        shown["status"] = [str(s) for s in df["status"]]
    shown["job"] = [str(j) for j in df["job"]] if "job" in df else []
    return pd.DataFrame({k: v for k, v in shown.items() if v})


# ------------------------------------------------------------------------------------- markdown


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def to_markdown(parts: list[Part], tr: Trust, invocation: str, made: str, commit: str | None) -> str:
    out = ["# Results", "",
           f"Made by `{invocation}` on {made} (harness commit {commit or 'unknown'}) from {len(parts)} sweep(s): "
           + ", ".join(f"{p.label} {p.title}" for p in parts) + ".", ""]
    out += ["## What to trust", ""]
    if tr.mixed:
        out += [f"- **Warning: {line}.** Rows made by different code are not one experiment." for line in tr.mixed]
        out.append("")
    for title, lines in tr.items:
        out.append(f"**{title}:**" + (" none." if not lines else ""))
        if lines:
            out.append("")
            out += [f"- {_md_cell(l)}" for l in lines]
        out.append("")
    for p in parts:
        out += [f"## {p.label}: {p.title}", ""]
        if p.spec and p.md_table:
            out += [p.md_table, ""]
        else:
            table = plain_table(p.tables.table)
            table = table.apply(lambda c: c.map(_md_cell))
            out += [table.to_markdown(index=False, disable_numparse=True), ""]
        if p.figure_name:
            out += [f"![{_md_cell(p.title)}]({p.figure_name})", ""]
        out += [_md_table(table_facts(p)), ""]
        out += _md_command(p)
    out += ["## Provenance", "", _md_table(provenance_rows(parts), ("field", "value")), ""]
    return "\n".join(out)


def _md_command(p: Part) -> list[str]:
    if not p.command.lines:
        return [f"No rerun command: {'; '.join(p.command.notes)}.", ""]
    commit = _values(p.prov.commits, "an unknown commit")
    return [f"Rerun (from the repository root, at commit {commit}; the rows land in "
            f"`{p.command.rerun_dir}`, images already in the store are reused -- add `run.store_dir=<empty dir>` "
            "to generate them again):", "", "```bash", p.command.text, "```", ""]


# ---------------------------------------------------------------------------------------- LaTeX

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "_": r"\_",
    "%": r"\%", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}
_LATEX_SPECIAL_RE = re.compile(r"[\\{}$&#_%~^]")

# characters the document declares (pdflatex's UTF-8 input has no glyph for them, or a fragile one)
UNICODE_LATEX = {
    "±": r"\ensuremath{\pm}", "−": r"\ensuremath{-}", "×": r"\ensuremath{\times}", "÷": r"\ensuremath{\div}",
    "Δ": r"\ensuremath{\Delta}", "δ": r"\ensuremath{\delta}", "μ": r"\ensuremath{\mu}", "µ": r"\ensuremath{\mu}",
    "σ": r"\ensuremath{\sigma}", "≈": r"\ensuremath{\approx}", "≤": r"\ensuremath{\leq}",
    "≥": r"\ensuremath{\geq}", "≠": r"\ensuremath{\neq}", "→": r"\ensuremath{\rightarrow}",
    "←": r"\ensuremath{\leftarrow}", "∞": r"\ensuremath{\infty}", "·": r"\ensuremath{\cdot}",
    "…": r"\ldots{}", "—": "---", "–": "--", "‘": "`", "’": "'", "“": "``", "”": "''", "§": r"\S{}",
    "\u2009": r"\,", "\u202f": r"\,", "\u00a0": "~", "°": r"\ensuremath{^\circ}", "²": r"\ensuremath{^2}",
    "✓": "yes", "✗": "no",
}


def latex_escape(text: Any) -> str:
    """Text for LaTeX: its special characters (``\\ { } $ & # _ % ~ ^``) escaped."""
    return _LATEX_SPECIAL_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], str(text))


def latex_code(text: str) -> str:
    """A command line for LaTeX (escaped; ``-`` kept from the ``--`` ligature; a line may break
    after ``/``, ``,`` and ``=``)."""
    out = latex_escape(text).replace("-", "-{}")
    return re.sub(r"([/,=])", r"\1\\allowbreak{}", out)


def unicode_declarations(body: str) -> str:
    """``\\DeclareUnicodeCharacter`` for every non-ASCII character of ``body`` that is not a
    Latin-1/Latin Extended-A letter (which T1 fonts carry): the known symbols as their LaTeX,
    anything else as ``?`` -- pdflatex stops at an undeclared one."""
    lines = []
    for ch in sorted({c for c in body if ord(c) > 127}):
        if ch in UNICODE_LATEX:
            lines.append(f"\\DeclareUnicodeCharacter{{{ord(ch):04X}}}{{{UNICODE_LATEX[ch]}}}")
        elif not (ch.isalpha() and ord(ch) <= 0x17F):
            lines.append(f"\\DeclareUnicodeCharacter{{{ord(ch):04X}}}{{?}}")
    return "\n".join(lines)


def _tex_tabular(df: pd.DataFrame, caption: str) -> str:
    """A longtable (booktabs rules) of text cells: settings left-aligned, measurements right."""
    spec = "".join("l" if c in SETTING_COLUMNS or c in ("status", "job") else "r" for c in df.columns)
    head = " & ".join(latex_escape(c) for c in df.columns) + r" \\"
    rows = [" & ".join(latex_escape(x) for x in r) + r" \\" for r in df.itertuples(index=False)]
    return "\n".join([r"{\small", rf"\begin{{longtable}}{{{spec}}}", rf"\caption{{{caption}}}\\", r"\toprule",
                      head, r"\midrule", r"\endhead", *rows, r"\bottomrule", r"\end{longtable}}"])


def _tex_facts(rows: list[tuple[str, str]]) -> str:
    """field/value rows as a two-column table (values may break after ``/``, ``,`` and ``=``)."""
    body = "\n".join(rf"{latex_escape(k)} & {latex_code(v)} \\" for k, v in rows)
    return ("\\par\\smallskip\\noindent{\\small\\begin{tabular}{@{}>{\\raggedright\\arraybackslash}p{0.2\\linewidth}>{\\raggedright\\arraybackslash}p{0.76\\linewidth}@{}}\n" + body
            + "\n\\end{tabular}}\\par\\smallskip")


def _tex_items(lines: list[str]) -> str:
    return "\\begin{itemize}\n" + "\n".join(rf"\item {latex_escape(l)}" for l in lines) + "\n\\end{itemize}"


def to_latex(parts: list[Part], tr: Trust, invocation: str, made: str, commit: str | None) -> str:
    body = [r"\section*{Results}",
            f"Made by \\texttt{{{latex_code(invocation)}}} on {latex_escape(made)} (harness commit "
            f"{latex_escape(commit or 'unknown')}) from {len(parts)} sweep(s): "
            + ", ".join(f"{p.label} {latex_escape(p.title)}" for p in parts) + ".",
            r"\subsection*{What to trust}"]
    if tr.mixed:
        body.append(_tex_items([f"WARNING: {l}. Rows made by different code are not one experiment."
                                for l in tr.mixed]).replace(r"\item WARNING", r"\item \textbf{WARNING}"))
    for title, lines in tr.items:
        body.append(rf"\paragraph{{{latex_escape(title)}:}}" + (" none." if not lines else ""))
        if lines:
            body.append(_tex_items(lines))
    for p in parts:
        body.append(rf"\subsection*{{{p.label}: {latex_escape(p.title)}}}")
        caption = f"{p.label}: {latex_escape(p.title)}"
        if p.spec and p.tex_table:
            if r"\begin{table}" in p.tex_table:
                body.append(p.tex_table)
            else:
                cells_line = next((l for l in p.md_table.splitlines() if l.startswith("Cells:")), "")
                body.append("\n".join([
                    r"\begin{table}[!htbp]\centering\small", rf"\caption{{{caption}}}",
                    r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%", p.tex_table, "}",
                    (rf"\par\smallskip{{\footnotesize {latex_escape(cells_line)}}}" if cells_line else ""),
                    r"\end{table}"]))
            if p.notes:
                body.append(r"\paragraph{Notes of the table.}")
                body.append(_tex_items(p.notes))
        else:
            body.append(_tex_tabular(plain_table(p.tables.table), caption))
        if p.figure_name:
            body.append("\n".join([r"\begin{figure}[!htbp]\centering",
                                   rf"\includegraphics[width=\linewidth]{{{p.figure_name}}}",
                                   rf"\caption{{{caption}}}", r"\end{figure}"]))
        body.append(_tex_facts(table_facts(p)))
        if p.command.lines:
            commit_text = _values(p.prov.commits, "an unknown commit")
            body.append(f"Rerun (from the repository root, at commit {latex_escape(commit_text)}; rows land in "
                        f"{latex_code(p.command.rerun_dir or '')}):")
            body.append("\\begin{flushleft}\\small\\ttfamily\n"
                        + "\\\\\n".join(latex_code(l) for l in p.command.lines) + "\n\\end{flushleft}")
        else:
            body.append(latex_escape("No rerun command: " + "; ".join(p.command.notes) + "."))
    body.append(r"\subsection*{Provenance}")
    body.append(_tex_facts(provenance_rows(parts)))
    text = "\n\n".join(body)
    preamble = "\n".join([
        r"\documentclass[10pt]{article}",
        r"\usepackage[utf8]{inputenc}",
        r"\usepackage[T1]{fontenc}",
        r"\IfFileExists{lmodern.sty}{\usepackage{lmodern}}{}",
        r"\usepackage{textcomp}",
        r"\usepackage[margin=2cm]{geometry}",
        r"\usepackage{array}",
        r"\usepackage{booktabs}",
        r"\usepackage{longtable}",
        r"\usepackage{graphicx}",
        unicode_declarations(text),
        r"\begin{document}",
    ])
    return preamble + "\n\n" + text + "\n\n\\end{document}\n"


# ---------------------------------------------------------------------------------------- write


@dataclass
class Written:
    paths: list[Path]  # report.md, report.tex, the figures
    parts: list[Part]
    trust: Trust

    @property
    def missing(self) -> list[str]:
        """One line per sweep with jobs that left no record."""
        return [p.tables.missing_line() for p in self.parts if p.tables.missing]


def write_report(sweep_dirs: list[str | Path], out_dir: str | Path, invocation: str | None = None) -> Written:
    """Rebuild the sweeps' tables and write ``report.md``, ``report.tex`` and the figures into
    ``out_dir`` (created). Raises ``FileNotFoundError`` when a sweep has neither a record nor
    a known job (:func:`bench.report.sweep.write_tables`)."""
    out = Path(out_dir)
    parts = collect(sweep_dirs)
    tr = trust(parts)
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    invocation = invocation or "python -m bench.report " + " ".join(
        shlex.quote(str(d)) for d in sweep_dirs) + f" --out {shlex.quote(str(out))}"
    commit = git_commit()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in parts:
        if p.figure and p.figure_name:
            paths.append(atomic_write_bytes(out / p.figure_name, p.figure.read_bytes()))
    paths.append(atomic_write_bytes(out / MD_NAME, to_markdown(parts, tr, invocation, made, commit).encode()))
    paths.append(atomic_write_bytes(out / TEX_NAME, to_latex(parts, tr, invocation, made, commit).encode()))
    return Written(paths, parts, tr)


def warn_mixed(tr: Trust, file=None) -> None:
    """The report's mixed-commit or mixed-version warnings, one line each (stderr by default)."""
    file = file or sys.stderr
    for line in tr.mixed:
        print(f"warning: {line}; the report flags it", file=file)
