"""``run.mode=plan``: what a command would cost, before it runs -- nothing is generated.

For a single run (``python run.py ... run.mode=plan``) or every job of a sweep
(``python run.py -m ... run.mode=plan``): the jobs, the images each would generate (an
uncached baseline shared by several jobs counted once; what the image store already
holds subtracted), MACs per image, estimated time per device kind and the store's disk
space. Printed as a table and written as ``plan.csv`` and ``plan.json`` into the run's
or the sweep's directory.

The store holdings come from the real store keys, so the plan loads each distinct model
(and pipeline) once, on the CPU, to fingerprint its weights -- as the run would; it runs
no denoising step. Time is estimated from the measured uncached throughput of the same
model on each device kind (``bench/assets/throughput.csv``, from the benchmarks in
``results/benchmarks/``): that throughput times the model's uncached MACs per image
gives the device's rate in MACs per second, and a job takes its MACs over that rate. A
cached run's measured speed-up is a few per cent below its MACs-predicted one
(docs/timing.md), so cached jobs are estimated a little short; a device kind without a
measurement of the model gets no estimate. Quality metrics (Inception, CLIP) are not
included.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from bench.core.resources import PACKAGE_DIR
from bench.cost import measure
from bench.models import loading as models
from bench.report.table import fmt
from bench.run import validate
from bench.run.parts import Parts, resolve
from bench.run.runner import Prepared, make_pipeline
from bench.sampling.store import ImageStore, key_digest
from metrics.files import atomic_write_bytes

THROUGHPUT_TABLE = PACKAGE_DIR / "assets" / "throughput.csv"
PLAN_CSV, PLAN_JSON = "plan.csv", "plan.json"


def throughput_table(path: Path = THROUGHPUT_TABLE) -> list[dict[str, Any]]:
    """The measured uncached throughputs: one row per (device kind, model, dtype)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["images_per_s"], r["model_calls"] = float(r["images_per_s"]), int(r["model_calls"])
    return rows


def _rates(model: str, dtype: str, macs_full_g: float, table: list[dict[str, Any]]) -> dict[str, float]:
    """G MACs per second of each device kind that measured ``model``; the run's dtype preferred."""
    out: dict[str, tuple[bool, float]] = {}
    for r in table:
        if r["model"] != model:
            continue
        same = r["dtype"] == dtype
        rate = r["images_per_s"] * macs_full_g * r["model_calls"]
        if r["device_kind"] not in out or (same and not out[r["device_kind"]][0]):
            out[r["device_kind"]] = (same, rate)
    return {k: v for k, (_, v) in out.items()}


class _Loaded:
    """Models and pipelines loaded once per distinct spec (a sweep's jobs share them)."""

    def __init__(self) -> None:
        self.models: dict[Any, models.LoadedModel] = {}
        self.pipes: dict[Any, Any] = {}

    def prepared(self, parts: Parts) -> tuple[Prepared, Any]:
        key = (parts.model, parts.dtype)
        if key not in self.models:
            self.models[key] = models.load_model(parts.model, "cpu", getattr(torch, parts.dtype))
        p = Prepared(parts, self.models[key])
        pkey = (parts.model, parts.inputs, parts.dtype)
        if pkey not in self.pipes:
            self.pipes[pkey] = make_pipeline(parts)
        return p, self.pipes[pkey]


def _held(store_dir: str, key: dict[str, Any], indices: range) -> int:
    """How many of ``indices`` the store already holds intact (read only)."""
    d = Path(store_dir) / key_digest(key)
    if not (d / "key.json").is_file():
        return 0
    return len(ImageStore.existing(d).present() & set(indices))


def plan_jobs(cfgs: list[Any], labels: list[str], table: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The plan of the runs ``cfgs`` (checked configs), one row per job, with totals."""
    table = throughput_table() if table is None else table
    loaded, rows, baselines = _Loaded(), [], {}
    kinds = sorted({r["device_kind"] for r in table})
    for label, cfg in zip(labels, cfgs):
        parts = resolve(cfg)
        cpu = dataclasses.replace(parts, device="cpu")  # fingerprints only: nothing runs on the device
        p, pipe = loaded.prepared(cpu)
        ref, indices = p.reference, parts.indices
        m = measure.macs_record(p.loaded, parts.model, p.caching, ref.num_calls)
        h, w, c = pipe.image_shape(p.loaded.sample_shape)
        image_bytes = h * w * c
        rates = _rates(parts.model.name, parts.dtype, m["macs_full_g"], table)
        row: dict[str, Any] = {
            "job": label, "model": parts.model.name, "sampler": parts.sampler.name, "steps": parts.sampler.steps,
            "cache": p.settings.label() if p.settings.enabled else "no cache",
            **{k: v for k, v in p.caching.record().items() if k in ("method", "schedule", "interval", "branch")},
            "num_samples": len(indices), "macs_run_g": m["macs_run_g"],
            "macs_predicted_speedup": m["macs_predicted_speedup"],
        }
        new_g = 0.0  # G MACs of the images this job generates itself
        if ref.is_run or parts.baseline_images:  # the uncached reference: shared by key
            key = p.store_key(p.baseline, pipe, baseline=True)
            digest = key_digest(key)
            if digest not in baselines:
                held = _held(parts.store_dir, key, indices)
                new = len(indices) - held
                baselines[digest] = {"new": new, "held": held, "macs_g": new * m["macs_full_g"] * ref.num_calls,
                                     "bytes": new * image_bytes, "rates": rates, "job": label}
            row["baseline_store"] = digest
            row["baseline_first_job"] = baselines[digest]["job"]
        if not ref.is_run:
            key = p.store_key(p.caching, pipe, baseline=False)
            held = _held(parts.store_dir, key, indices)
            row.update(new_images=len(indices) - held, held_images=held)
            new_g = row["new_images"] * m["macs_run_g"]
            row["disk_bytes"] = row["new_images"] * image_bytes
        else:
            row.update(new_images=0, held_images=0, disk_bytes=0)
        b = baselines.get(row.get("baseline_store"))
        first = b is not None and b["job"] == label  # the job that generates the shared baseline
        if first:
            row["baseline_new_images"], row["baseline_held_images"] = b["new"], b["held"]
            row["disk_bytes"] += b["bytes"]
            new_g += b["macs_g"]
        row["macs_new_g"] = new_g
        for kind in kinds:
            row[f"hours_{kind}"] = new_g / rates[kind] / 3600 if kind in rates else None
        rows.append(row)
    totals = {
        "jobs": len(rows),
        "images_to_generate": sum(r["new_images"] + r.get("baseline_new_images", 0) for r in rows),
        "images_in_store": sum(r["held_images"] + r.get("baseline_held_images", 0) for r in rows),
        "macs_new_g": sum(r["macs_new_g"] for r in rows),
        "disk_bytes": sum(r["disk_bytes"] for r in rows),
    }
    for kind in kinds:
        hours = [r[f"hours_{kind}"] for r in rows]
        totals[f"hours_{kind}"] = None if any(h is None for h in hours) else sum(hours)
    return {"rows": rows, "totals": totals, "device_kinds": kinds,
            "throughput_table": str(THROUGHPUT_TABLE.relative_to(PACKAGE_DIR.parent))}


def summary(plan: dict[str, Any]) -> str:
    """The plan for people: one line per job, then the totals."""
    lines = []
    kinds = plan["device_kinds"]
    for r in plan["rows"]:
        what = r["cache"]
        est = ", ".join(f"{k} {_hours(r[f'hours_{k}'])}" for k in kinds if r[f"hours_{k}"] is not None)
        base = r.get("baseline_new_images")
        lines.append(
            f"  [{r['job']}] {r['model']} {r['sampler']}-{r['steps']} {what}: {r['new_images']} images to generate"
            + (f" + {base} baseline" if base else "") + f", {r['held_images']} in the store; "
            f"{fmt(r['macs_run_g'])} G MACs per image" + (f"; {est}" if est else "")
        )
    t = plan["totals"]
    est = "; ".join(
        f"{k}: {_hours(t[f'hours_{k}'])}" if t[f"hours_{k}"] is not None else f"{k}: not measured for {_unmeasured(plan, k)}"
        for k in kinds
    )
    lines.append(
        f"plan: {t['jobs']} jobs, {t['images_to_generate']} images to generate ({t['images_in_store']} already in "
        f"the store), {_macs(t['macs_new_g'])}, {_size(t['disk_bytes'])} of store; estimated {est} "
        f"(from {plan['throughput_table']}; quality metrics not included); nothing was generated"
    )
    return "\n".join(lines)


def _macs(g: float) -> str:
    for unit in ("G", "T", "P", "E"):
        if g < 1000 or unit == "E":
            return f"{fmt(g)} {unit} MACs"
        g /= 1000
    return f"{g} G MACs"


def _hours(h: float) -> str:
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def write_plan(out_dir: str | Path, plan: dict[str, Any]) -> Path:
    """``plan.csv`` (one row per job) and ``plan.json`` (rows, totals) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in plan["rows"]:
        columns += [c for c in r if c not in columns]
    lines = [",".join(columns)]
    for r in plan["rows"]:
        lines.append(",".join(_csv(r.get(c)) for c in columns))
    atomic_write_bytes(out / PLAN_CSV, ("\n".join(lines) + "\n").encode())
    return atomic_write_bytes(out / PLAN_JSON, (json.dumps(plan, indent=2, default=str) + "\n").encode())


def _csv(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plan_run(cfg: Any, out_dir: str | Path) -> dict[str, Any]:
    """A single run's plan (``python run.py ... run.mode=plan``), printed and written."""
    validate.check(cfg)
    plan = plan_jobs([cfg], ["run"])
    print(summary(plan))
    print(f"plan: {write_plan(out_dir, plan).parent / PLAN_CSV}")
    return plan


def _unmeasured(plan: dict[str, Any], kind: str) -> str:
    return ", ".join(sorted({r["model"] for r in plan["rows"] if r[f"hours_{kind}"] is None}))
