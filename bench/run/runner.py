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

from bench.caching.method import CacheError, Caching, apply, uncached
from bench.core.errors import HarnessError, one_line
from bench.core.options import Mode, Output, Schedule, Timing, value
from bench.cost import measure
from bench.models import loading as models
from bench.models.pipelines import Pixels
from bench.report.records import environment, write_record
from bench.report.table import format_row
from bench.run import distributed, validate
from bench.run.parts import Parts, group_options, resolve
from bench.sampling import generate
from bench.sampling import loop as sampling
from bench.sampling.store import ImageStore
from metrics.features import MissingWeightsError
from metrics.fidelity import Fidelity
from metrics.quality import QualityEvaluator


def settings_record(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


class Prepared:
    """Everything a mode needs: the run's parts, the model, the caching method's plan, the baseline."""

    def __init__(self, parts: Parts, loaded: models.LoadedModel | None = None):
        self.parts = parts
        self.loaded = loaded or models.load_model(parts.model, parts.device, getattr(torch, parts.dtype))
        self.settings = parts.cache
        scheduler = sampling.build_scheduler(parts.sampler, self.loaded.scheduler_config)
        self.num_calls = sampling.num_model_calls(scheduler)
        target = parts.target
        calibrate = generate.calibration(self.loaded, parts.model, parts.sampler, parts.generation)
        try:  # validates the method's settings against this model and this sampler
            self.caching = apply(self.settings, self.loaded.unet, self.num_calls, target, calibrate)
        except CacheError as e:
            raise HarnessError(str(e)) from None
        self.full_calls = self.caching.plan.full_calls
        self.reference = measure.baseline_for(parts.sampler, parts.baseline_steps, self.loaded, self.settings.enabled,
                                              self.num_calls)
        self.baseline = uncached(self.reference.num_calls, target)

    def record(self, settings: dict[str, Any], mode: str) -> dict[str, Any]:
        return {
            "mode": mode,
            "settings": settings,
            "cache": self.caching.record(),
            "model_source": self.loaded.source,
            "weights_fingerprint": self.loaded.fingerprint,
            "num_model_calls": self.num_calls,
            "full_calls": self.full_calls,
            "num_full_calls": len(self.full_calls),
        }

    def baseline_record(self) -> dict[str, Any]:
        """What identifies the baseline row: uncached, at the reference's steps."""
        return {
            "cache": dict(BASELINE_CACHE),
            "steps": self.reference.sampler.steps,
            "num_model_calls": self.reference.num_calls,
        }

    def store_key(self, caching: Caching, pipe: Any, baseline: bool) -> dict[str, Any]:
        """What identifies the images of the cached run, or of its baseline (at the reference's steps)."""
        sampler = self.reference.sampler if baseline else self.parts.sampler
        return generate.store_key(self.loaded, self.parts.model, sampler, caching, self.parts.generation, pipe)

    def store(self, caching: Caching, pipe: Any, baseline: bool) -> ImageStore:
        """The image store of the cached run, or of its baseline (created if new)."""
        return ImageStore(Path(self.parts.store_dir), self.store_key(caching, pipe, baseline))


# the baseline row's cache section: uncached, whatever the run's method (DeepCache's settings
# columns, as the tables have always shown it)
BASELINE_CACHE: dict[str, Any] = {
    "interval": 1, "branch": None, "schedule": Schedule.none.value, "center": None, "power": None,
    "ablation": "none", "skip_producer": None, "skip_consumer": None,
}


def _cost(p: Prepared) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(measurements of the cached run, of the baseline, timing details or None)."""
    ref, parts = p.reference, p.parts
    cached = measure.macs_record(p.loaded, parts.model, p.caching, ref.num_calls)
    base = {
        "macs_g": cached["macs_full_g"],
        "macs_all_g": cached["macs_full_all_g"],
        "macs_full_g": cached["macs_full_g"],
        "macs_run_g": cached["macs_full_g"] * ref.num_calls,
        "macs_predicted_speedup": 1.0,
    }
    details = None
    if parts.timing.method != Timing.off:
        timed, details = measure.timing_record(p.loaded, parts.model, parts.sampler, parts.timing, p.caching, ref)
        cached.update(timed)
        base.update(throughput=timed["throughput_baseline"], speedup=1.0, timing_method=timed["timing_method"],
                    timing_batch_size=timed["timing_batch_size"])
    return cached, base, details


def _with_cost(record: dict[str, Any], p: Prepared) -> dict[str, Any]:
    cached, base, details = _cost(p)
    record["measurements"] = {**cached, **record.get("measurements", {})}
    if not p.reference.is_run:
        record.setdefault("baseline", p.baseline_record())
        record["baseline"]["measurements"] = {**base, **record["baseline"].get("measurements", {})}
    record["macs_convention"] = measure.MACS_CONVENTION
    if details is not None:
        record["timing"] = details
    return record


def run_cost(cfg: Any, parts: Parts) -> dict[str, Any] | None:
    """Schedule, MACs and throughput of the cached sampling loop; no weights needed.
    Rank 0 only: the other ranks sync and return None."""
    ctx = distributed.current()
    ctx.sync(None)
    if not ctx.is_main:
        return None
    p = Prepared(parts)
    return _with_cost(p.record(settings_record(cfg), Mode.cost.value), p)


def make_pipeline(parts: Parts) -> Any:
    """Conditioning + decoding around the U-Net (``model.pipeline``), pixels by default."""
    m = parts.model
    if m.pipeline is None:
        if m.output != Output.pixels:
            raise HarnessError(
                f"model {m.name} samples {m.output} and has no model.pipeline to decode them; use run.mode=cost"
            )
        return Pixels()
    return get_class(m.pipeline)(m, parts.inputs, parts.device, getattr(torch, parts.dtype))


def _generate(p: Prepared, indices: range, pipe: Any) -> dict[str, Any]:
    """Generate the baseline (unless ``run.baseline_images`` is off) and, when the run is not
    its own baseline, the run's images into the store.

    With several processes each generates its part of ``indices``, then all sync
    (:mod:`bench.run.distributed`); the record covers ``indices``."""
    ctx = distributed.current()
    mine = ctx.part(indices)
    ref, gen = p.reference, p.parts.generation
    base = base_store = cached = store = None
    if ref.is_run or p.parts.baseline_images:
        base_store = p.store(p.baseline, pipe, baseline=True)
        base = generate.generate(p.loaded, ref.sampler, p.baseline, base_store, mine, pipe, gen, desc="baseline")
    if not ref.is_run:
        store = p.store(p.caching, pipe, baseline=False)
        cached = generate.generate(p.loaded, p.parts.sampler, p.caching, store, mine, pipe, gen,
                                   desc=p.settings.label())
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


def run_generate(cfg: Any, parts: Parts) -> dict[str, Any] | None:
    """Images only (baseline and cached), into the store; no metrics, no timing.
    None on ranks > 0, after the sync."""
    p = Prepared(parts)
    generated = _generate(p, parts.indices, make_pipeline(parts))
    if not distributed.current().is_main:
        return None
    return {**p.record(settings_record(cfg), Mode.generate.value), **generated}


def run_full(cfg: Any, parts: Parts) -> dict[str, Any] | None:
    """Generate (baseline + cached), quality metrics for both, cost; one record.
    Ranks > 0 only generate their part and return None after the sync."""
    p = Prepared(parts)
    indices = parts.indices
    evaluate = quality_evaluator(cfg, parts)  # fails before any image is generated
    fidelity = fidelity_scorer(cfg, parts)  # likewise
    pipe = make_pipeline(parts)
    generated = _generate(p, indices, pipe)
    if not distributed.current().is_main:
        return None
    record = {**p.record(settings_record(cfg), Mode.full.value), **generated}
    prompts = pipe.prompts_for(indices)
    images, base = ImageStore.existing(record["store"]).load(indices), None
    if "store" in record.get("baseline", {}):  # sample i of both from the same noise: paired differences
        base = ImageStore.existing(record["baseline"]["store"]).load(indices)
        record["measurements"], record["baseline"]["measurements"] = evaluate.paired(images, base, prompts)
    else:
        record["measurements"] = evaluate(images, prompts)
    add_fidelity(record, fidelity, images, base)
    return _with_cost(record, p)


class _Scoring:
    """A quality evaluator whose ``ValueError`` becomes a one-line :class:`HarnessError`."""

    def __init__(self, evaluator: QualityEvaluator):
        self.evaluator = evaluator

    def __call__(self, images: Any, prompts: Any) -> dict[str, Any]:
        try:
            return self.evaluator(images, prompts)
        except ValueError as e:
            raise HarnessError(f"quality: {one_line(e)}") from None

    def paired(self, images: Any, baseline: Any, prompts: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            return self.evaluator.paired(images, baseline, prompts)
        except ValueError as e:
            raise HarnessError(f"quality: {one_line(e)}") from None


def quality_evaluator(cfg: Any, parts: Parts) -> _Scoring:
    """The ``quality`` config instantiated (a :class:`metrics.quality.QualityEvaluator`):
    ``(images, prompts) -> measurements``, ``.paired(images, baseline, prompts)`` -> both;
    asked whether it can score ``run.num_samples`` images before anything is generated."""
    if not cfg.quality:
        raise HarnessError(
            f"model {parts.model.name} has no quality config (quality={'|'.join(group_options('quality'))}); "
            "use run.mode=generate or run.mode=cost"
        )
    evaluator = _evaluator(cfg, parts)
    try:
        evaluator.check_samples(parts.num_samples)
    except ValueError as e:
        raise HarnessError(f"run.num_samples={parts.num_samples} cannot be scored: {one_line(e)}") from None
    return _Scoring(evaluator)


_LAST_EVALUATOR: dict[str, Any] = {}


def _evaluator(cfg: Any, parts: Parts) -> QualityEvaluator:
    """Instantiate ``cfg.quality``; the jobs of a sweep in one process share it (loading
    Inception or CLIP once), as long as its settings are the same."""
    device = cfg.metrics.device or parts.device
    progress = parts.generation.progress
    key = json.dumps([OmegaConf.to_container(cfg.quality, resolve=True), device, progress], default=str)
    if key in _LAST_EVALUATOR:
        return _LAST_EVALUATOR[key]
    try:
        evaluator = instantiate(cfg.quality, device=device, progress=progress, _convert_="partial")
    except InstantiationException as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        raise HarnessError(f"quality ({cfg.quality._target_}): {one_line(cause)}") from None
    if not isinstance(evaluator, QualityEvaluator):
        raise HarnessError(f"quality ({cfg.quality._target_}) is not a quality evaluator "
                           "(metrics.quality.QualityEvaluator: check_samples, __call__ and paired)")
    _LAST_EVALUATOR.clear()  # one at a time: a sweep over models does not pile them up
    _LAST_EVALUATOR[key] = evaluator
    return evaluator


# ------------------------------------------------------------------ fidelity to the uncached image

FIDELITY_CHUNK = 1024  # image pairs compared at once (bounds the metrics' intermediates)
_LAST_FIDELITY: dict[str, Fidelity] = {}


def fidelity_scorer(cfg: Any, parts: Parts) -> Fidelity | None:
    """``metrics.fidelity`` as a :class:`metrics.fidelity.Fidelity` (None for ``[]``), built
    before anything is generated: LPIPS asked for by name without its weights is refused
    here; left to the default, it is skipped with one warning line. A sweep's jobs share it."""
    m = cfg.metrics
    which = None if m.fidelity is None else [value(x) for x in m.fidelity]
    if which == []:
        return None
    device = m.device or parts.device
    key = json.dumps([which, value(m.lpips_net), m.lpips_backbone_weights, device, m.batch_size])
    scorer = _LAST_FIDELITY.get(key)
    if scorer is None:
        try:
            scorer = Fidelity(which, lpips_net=value(m.lpips_net), lpips_backbone_weights=m.lpips_backbone_weights,
                              device=device, batch_size=m.batch_size, progress=parts.generation.progress)
        except (MissingWeightsError, ValueError) as e:
            raise HarnessError(f"metrics.fidelity: {one_line(e)}") from None
        _LAST_FIDELITY.clear()
        _LAST_FIDELITY[key] = scorer
    if scorer.lpips_missing:
        print(f"warning: {scorer.lpips_missing}", file=sys.stderr)
    return scorer


def add_fidelity(record: dict[str, Any], scorer: Fidelity | None, images: Any, base: Any) -> None:
    """PSNR / SSIM / LPIPS of each cached image against the baseline image of the same index,
    into the run's measurements (the baseline row gets none); only where the baseline's
    images exist (``base`` not None). Compared chunk by chunk, bounding the metrics' own
    intermediates."""
    if scorer is None or base is None:
        return
    chunks = ((images[i:i + FIDELITY_CHUNK], base[i:i + FIDELITY_CHUNK]) for i in range(0, len(images), FIDELITY_CHUNK))
    try:
        record["measurements"].update(scorer.score_chunks(chunks))
    except ValueError as e:
        raise HarnessError(f"metrics.fidelity: {one_line(e)}") from None


MODES: dict[str, Callable[[Any, Parts], dict[str, Any] | None]] = {
    Mode.full.value: run_full,
    Mode.generate.value: run_generate,
    Mode.cost.value: run_cost,
}


def run(cfg: Any, out_dir: str | Path) -> Path | None:
    """Execute one run described by ``cfg``; returns the path of its ``run.json``
    (None on a rank > 0 of a multi-process run, which writes no record).

    The config is checked (:func:`bench.run.validate.check`), then resolved into typed
    parts (:func:`bench.run.parts.resolve`) that the layers below take; it goes no lower.
    On failure the record is written with ``status: failed`` and the exception is
    raised again.
    """
    t0 = time.perf_counter()
    ctx = distributed.current()
    device = str(cfg.run.device)
    try:
        validate.check(cfg)
        ctx = distributed.setup(cfg.run.device)
        device = ctx.device
        parts = resolve(cfg, device)
        if parts.threads:
            torch.set_num_threads(parts.threads)
        if parts.mode not in MODES:  # run.mode=plan is the command line's (bench.run.plan)
            raise HarnessError(f"run.mode={parts.mode} is not a mode of a run: {', '.join(MODES)}")
        result = MODES[parts.mode](cfg, parts)
    except BaseException as e:
        ctx.fail(e)  # a rank that fails before the sync still joins it: the others fail too
        if ctx.is_main:
            _write_failure(cfg, out_dir, e, time.perf_counter() - t0, device)
        raise
    if result is None:
        return None
    record = {"status": "ok", **result}
    record["wall_time_s"] = time.perf_counter() - t0
    record["environment"] = environment(device)
    try:
        path = write_record(out_dir, record)
    except OSError as e:
        raise HarnessError(f"cannot write the run record into {out_dir}: {e.strerror}") from None
    print(summary(record))
    print(f"run record: {path}")
    return path


def _write_failure(cfg: Any, out_dir: str | Path, error: BaseException, wall: float, device: str) -> None:
    message = one_line(error) if isinstance(error, HarnessError) else (
        "interrupted" if isinstance(error, KeyboardInterrupt) else one_line(error, typed=True)
    )
    record = {"status": "failed", "error": message, "mode": value(cfg.run.mode), "wall_time_s": wall}
    try:
        record["settings"] = settings_record(cfg)
    except Exception:  # an unresolvable setting is itself the error being recorded
        record["settings"] = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    if not isinstance(error, (HarnessError, KeyboardInterrupt)):
        record["traceback"] = traceback.format_exception(error)[-8:]
    record["environment"] = environment(device)
    try:
        write_record(out_dir, record)
    except OSError:
        pass  # the original error is what the user needs to see


def summary(record: dict[str, Any]) -> str:
    """A few human lines: the run and its baseline, speed-up with its spread, MACs, quality."""
    lines = []
    if "baseline" in record:
        base = record["baseline"]
        lines.append(format_row({**base["cache"], "steps": base.get("steps"), **base.get("measurements", {})}))
    steps = record["settings"]["sampler"]["steps"]
    lines.append(format_row({**record["cache"], "steps": steps, **record.get("measurements", {})}))
    return "\n".join(lines)
