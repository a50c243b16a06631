"""Run orchestration: config -> model + sampler + cache -> measurements -> ``run.json``.

``run(cfg, out_dir)`` is what the command line hands over to. Every setting is
checked first (:mod:`bench.run.validate`); each ``run.mode`` is one small function in
``MODES``; quality metrics are whatever ``cfg.quality`` instantiates (a
``conf/quality/*.yaml``), so the runner never asks which metrics exist.

The record (``run.json``) holds the resolved settings, what was run (cache
settings, full calls, weights fingerprint, image store), ``measurements`` of the
cached run and of its uncached ``baseline`` (the table's cells), timing details and
the environment. A run that fails writes a record too, with ``status: failed`` and
the error, so a sweep's table shows the failed row and nothing half-done is trusted.

Under ``torchrun`` (:mod:`bench.run.distributed`) the same functions run on every rank:
each generates its part of the samples, the ranks sync, and rank 0 alone measures
and writes the record.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from bench.run import distributed
from bench.sampling import generate
from bench.cost import measure
from bench.models import loading as models
from bench.sampling import loop as sampling
from bench.run import validate
from bench.core.errors import HarnessError
from bench.caching.engine import CacheError, CacheSettings, DeepCache
from bench.core.options import Mode, value
from bench.models.pipelines import Pixels
from bench.report.records import cache_section, environment, write_record
from bench.sampling.store import ImageStore, shard_range


def settings_record(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _dtype(name: Any) -> torch.dtype:
    return getattr(torch, value(name))


def _setup(cfg: Any) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


class Prepared:
    """Everything a mode needs: model, resolved cache settings, the plan."""

    def __init__(self, cfg: Any):
        self.loaded = models.load_model(cfg.model, cfg.run.device, _dtype(cfg.run.dtype))
        self.settings = models.cache_settings(cfg.cache, cfg.model, cfg.run.prompts.name)
        scheduler = sampling.build_scheduler(cfg.sampler, self.loaded.scheduler_config)
        self.num_calls = sampling.num_model_calls(scheduler)
        try:  # validates branch and schedule against this model and this sampler
            plan = DeepCache(self.loaded.unet, self.settings, self.num_calls)
        except CacheError as e:
            raise HarnessError(str(e)) from None
        self.full_calls, self.skip = plan.state.plan, plan.skip
        self.baseline = CacheSettings(interval=1, branch=self.settings.branch, schedule="none")
        self.reference = measure.baseline_for(cfg, self.loaded, self.settings, self.num_calls)

    def record(self, cfg: Any, mode: str) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": mode,
            "settings": settings_record(cfg),
            "cache": {**cache_section(s), "skip_producer": self.skip.producer, "skip_consumer": self.skip.consumer},
            "model_source": self.loaded.source,
            "weights_fingerprint": self.loaded.fingerprint,
            "num_model_calls": self.num_calls,
            "full_calls": self.full_calls,
            "num_full_calls": len(self.full_calls),
        }

    def baseline_record(self) -> dict[str, Any]:
        """What identifies the baseline row: uncached, at the reference's steps."""
        return {
            "cache": {**self.baseline.__dict__, "branch": None, "skip_producer": None, "skip_consumer": None},
            "steps": self.reference.cfg.sampler.steps,
            "num_model_calls": self.reference.num_calls,
        }


def _cost(p: Prepared, cfg: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(measurements of the cached run, of the baseline, timing details or None)."""
    ref = p.reference
    cached = measure.macs_record(p.loaded, cfg.model, p.settings, p.full_calls, p.num_calls, ref.num_calls)
    base = {
        "macs_g": cached["macs_full_g"],
        "macs_all_g": cached["macs_full_all_g"],
        "macs_full_g": cached["macs_full_g"],
        "macs_run_g": cached["macs_full_g"] * ref.num_calls,
        "macs_predicted_speedup": 1.0,
    }
    details = None
    if value(cfg.run.timing) != "off":
        timed, details = measure.timing_record(p.loaded, cfg, p.settings, p.full_calls, p.num_calls, ref)
        cached.update(timed)
        base.update(throughput=timed["throughput_baseline"], speedup=1.0, timing_method=timed["timing_method"],
                    timing_batch_size=timed["timing_batch_size"])
    return cached, base, details


def _with_cost(record: dict[str, Any], p: Prepared, cfg: Any) -> dict[str, Any]:
    cached, base, details = _cost(p, cfg)
    record["measurements"] = {**cached, **record.get("measurements", {})}
    if not p.reference.is_run:
        record.setdefault("baseline", p.baseline_record())
        record["baseline"]["measurements"] = {**base, **record["baseline"].get("measurements", {})}
    record["macs_convention"] = measure.MACS_CONVENTION
    if details is not None:
        record["timing"] = details
    return record


def run_cost(cfg: Any) -> dict[str, Any] | None:
    """Schedule, MACs and throughput of the cached sampling loop; no weights needed.
    Rank 0 only: the other ranks sync and return None."""
    ctx = distributed.current()
    ctx.sync(None)
    if not ctx.is_main:
        return None
    p = Prepared(cfg)
    return _with_cost(p.record(cfg, Mode.cost.value), p, cfg)


def make_pipeline(cfg: Any) -> Any:
    """Conditioning + decoding around the U-Net (``model.pipeline``), pixels by default."""
    if cfg.model.pipeline is None:
        if cfg.model.output != "pixels":
            raise HarnessError(
                f"model {cfg.model.name} samples {cfg.model.output} and has no model.pipeline to decode "
                "them; use run.mode=cost"
            )
        return Pixels()
    return get_class(cfg.model.pipeline)(cfg.model, cfg.run, cfg.run.device, _dtype(cfg.run.dtype))


def _indices(cfg: Any) -> range:
    if cfg.run.shard is None:
        return range(cfg.run.num_samples)
    return shard_range(cfg.run.num_samples, cfg.run.shards, cfg.run.shard)


def _generate(p: Prepared, cfg: Any, indices: range, pipe: Any) -> dict[str, Any]:
    """Generate the baseline (unless ``run.baseline_images`` is off) and, when the run is not
    its own baseline, the run's images into the store.

    With several processes each generates its part of ``indices``, then all sync
    (:mod:`bench.run.distributed`); the record covers ``indices``."""
    ctx = distributed.current()
    mine = ctx.part(indices)
    root, ref = Path(cfg.run.store_dir), p.reference
    base = base_store = cached = store = None
    if ref.is_run or cfg.run.baseline_images:
        base_store = ImageStore(root, generate.store_key(p.loaded, ref.cfg, p.baseline, list(range(ref.num_calls)), pipe))
        base = generate.generate(p.loaded, ref.cfg, p.baseline, base_store, mine, pipe, desc="baseline")
    if not ref.is_run:
        store = ImageStore(root, generate.store_key(p.loaded, cfg, p.settings, p.full_calls, pipe))
        cached = generate.generate(p.loaded, cfg, p.settings, store, mine, pipe, desc=f"N={p.settings.interval}")
    parts = ctx.sync({"part": [mine.start, mine.stop], "baseline": base, "cached": cached})
    record: dict[str, Any] = {"num_samples": len(indices), "sample_indices": [indices.start, indices.stop]}
    if ctx.distributed:
        base, cached = _merged([x["baseline"] for x in parts]), _merged([x["cached"] for x in parts])
        record["distributed"] = ctx.record([range(*x["part"]) for x in parts])
    if ref.is_run:
        return {**record, "store": str(base_store.dir), "generation": base}
    baseline = {} if base_store is None else {"store": str(base_store.dir), "generation": base}
    return {**record, "store": str(store.dir), "generation": cached, "baseline": {**p.baseline_record(), **baseline}}


def _merged(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The generation record of a run from those of its ranks' parts."""
    if parts[0] is None:
        return None
    times = [x["generation_time_s"] for x in parts if x["generation_time_s"] is not None]
    return {
        "generated": sum(x["generated"] for x in parts),
        "reused": sum(x["reused"] for x in parts),
        "generation_time_s": max(times) if times else None,  # the ranks ran at the same time
        "executed_full_calls": next((x["executed_full_calls"] for x in parts if x["executed_full_calls"]), None),
        "by_rank": parts,
    }


def run_generate(cfg: Any) -> dict[str, Any] | None:
    """Images only (baseline and cached), into the store; no metrics, no timing.
    None on ranks > 0, after the sync."""
    p = Prepared(cfg)
    pipe = make_pipeline(cfg)
    generated = _generate(p, cfg, _indices(cfg), pipe)
    if not distributed.current().is_main:
        return None
    return {**p.record(cfg, Mode.generate.value), **generated}


def run_full(cfg: Any) -> dict[str, Any] | None:
    """Generate (baseline + cached), quality metrics for both, cost; one record.
    Ranks > 0 only generate their part and return None after the sync."""
    p = Prepared(cfg)
    indices = _indices(cfg)
    evaluate = quality_evaluator(cfg)  # fails before any image is generated
    pipe = make_pipeline(cfg)
    generated = _generate(p, cfg, indices, pipe)
    if not distributed.current().is_main:
        return None
    record = {**p.record(cfg, Mode.full.value), **generated}
    prompts = pipe.prompts_for(indices)
    record["measurements"] = evaluate(ImageStore.existing(record["store"]).load(indices), prompts)
    if "store" in record.get("baseline", {}):
        base = ImageStore.existing(record["baseline"]["store"]).load(indices)
        record["baseline"]["measurements"] = evaluate(base, prompts)
    return _with_cost(record, p, cfg)


def quality_evaluator(cfg: Any) -> Callable[[Any, Any], dict[str, Any]]:
    """The ``quality`` config instantiated: ``(images, prompts) -> measurements``; checked
    against ``run.num_samples`` before anything is generated."""
    if not cfg.quality:
        raise HarnessError(
            f"model {cfg.model.name} has no quality config (quality=adm_inception|adm_digits|clip); "
            "use run.mode=generate or run.mode=cost"
        )
    evaluator = _evaluator(cfg)
    if cfg.run.num_samples < evaluator.min_samples:
        raise HarnessError(
            f"run.num_samples={cfg.run.num_samples} is smaller than quality.is_split_size={evaluator.min_samples} "
            "(Inception Score splits; ADM: 5000): lower quality.is_split_size or drop 'is' from quality.which"
        )

    def evaluate(images: Any, prompts: Any) -> dict[str, Any]:
        try:
            return evaluator(images, prompts)
        except ValueError as e:
            raise HarnessError(f"quality: {_one_line(e)}") from None

    return evaluate


_LAST_EVALUATOR: dict[str, Any] = {}


def _evaluator(cfg: Any) -> Any:
    """Instantiate ``cfg.quality``; the jobs of a sweep in one process share it (loading
    Inception or CLIP once), as long as its settings are the same."""
    device = cfg.metrics.device or cfg.run.device
    key = json.dumps([OmegaConf.to_container(cfg.quality, resolve=True), device, cfg.run.progress], default=str)
    if key in _LAST_EVALUATOR:
        return _LAST_EVALUATOR[key]
    try:
        evaluator = instantiate(cfg.quality, device=device, progress=cfg.run.progress, _convert_="partial")
    except InstantiationException as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise HarnessError(f"quality ({cfg.quality._target_}): {_one_line(cause)}") from None
    _LAST_EVALUATOR.clear()  # one at a time: a sweep over models does not pile them up
    _LAST_EVALUATOR[key] = evaluator
    return evaluator


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


MODES: dict[str, Callable[[Any], dict[str, Any] | None]] = {
    Mode.full.value: run_full,
    Mode.generate.value: run_generate,
    Mode.cost.value: run_cost,
}


def run(cfg: Any, out_dir: str | Path) -> Path | None:
    """Execute one run described by ``cfg``; returns the path of its ``run.json``
    (None on a rank > 0 of a multi-process run, which writes no record).

    On failure the record is written with ``status: failed`` and the exception is
    raised again.
    """
    t0 = time.perf_counter()
    ctx = distributed.current()
    try:
        validate.check(cfg)
        ctx = distributed.setup(cfg)
        _setup(cfg)
        result = MODES[value(cfg.run.mode)](cfg)
    except BaseException as e:
        ctx.fail(e)  # a rank that fails before the sync still joins it: the others fail too
        if ctx.is_main:
            _write_failure(cfg, out_dir, e, time.perf_counter() - t0)
        raise
    if result is None:
        return None
    record = {"status": "ok", **result}
    record["wall_time_s"] = time.perf_counter() - t0
    record["environment"] = environment(cfg.run.device)
    try:
        path = write_record(out_dir, record)
    except OSError as e:
        raise HarnessError(f"cannot write the run record into {out_dir}: {e.strerror}") from None
    print(summary(record))
    print(f"run record: {path}")
    return path


def _write_failure(cfg: Any, out_dir: str | Path, error: BaseException, wall: float) -> None:
    message = _one_line(error) if isinstance(error, HarnessError) else (
        "interrupted" if isinstance(error, KeyboardInterrupt)
        else f"{type(error).__name__}: {_one_line(error)}"
    )
    record = {"status": "failed", "error": message, "mode": value(cfg.run.mode), "wall_time_s": wall}
    try:
        record["settings"] = settings_record(cfg)
    except Exception:  # an unresolvable setting is itself the error being recorded
        record["settings"] = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    if not isinstance(error, (HarnessError, KeyboardInterrupt)):
        record["traceback"] = traceback.format_exception(error)[-8:]
    record["environment"] = environment(cfg.run.device)
    try:
        write_record(out_dir, record)
    except OSError:
        pass  # the original error is what the user needs to see


def summary(record: dict[str, Any]) -> str:
    """A few human lines: the run and its baseline, speed-up with its spread, MACs, quality."""
    from bench.report.table import format_row

    lines = []
    if "baseline" in record:
        base = record["baseline"]
        lines.append(format_row({**base["cache"], "steps": base.get("steps"), **base.get("measurements", {})}))
    steps = record["settings"]["sampler"]["steps"]
    lines.append(format_row({**record["cache"], "steps": steps, **record.get("measurements", {})}))
    return "\n".join(lines)
