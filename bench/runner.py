"""Run orchestration: config -> model + sampler + cache -> measurements -> ``run.json``.

``run(cfg, out_dir)`` is what ``run.py`` hands over to. Each ``run.mode`` is one
small function in ``MODES``; metrics are reached only through ``metrics``' public
functions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate

from bench import generate, measure, models, sampling
from bench.config import HarnessError
from bench.engine import CacheError, CacheSettings, DeepCache
from bench.pipeline import Pixels
from bench.records import environment, write_record
from bench.store import ImageStore, shard_range


def settings_record(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise HarnessError(f"run.dtype={name!r} is not a torch dtype (float32, float16, bfloat16)")
    return dtype


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _setup(cfg: Any) -> None:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"run.device={cfg.run.device!r} but CUDA is not available (use cpu)")


class Prepared:
    """Everything a mode needs: model, resolved cache settings, the plan."""

    def __init__(self, cfg: Any):
        self.loaded = models.load_model(cfg.model, cfg.run.device, _dtype(cfg.run.dtype))
        self.settings = models.cache_settings(cfg.cache, cfg.model)
        scheduler = sampling.build_scheduler(cfg.sampler, self.loaded.scheduler_config)
        self.num_calls = sampling.num_model_calls(scheduler)
        try:  # validates branch and schedule against this model and this sampler
            plan = DeepCache(self.loaded.unet, self.settings, self.num_calls)
        except CacheError as e:
            raise HarnessError(str(e)) from None
        self.full_calls, self.skip = plan.state.plan, plan.skip
        self.baseline = CacheSettings(interval=1, branch=self.settings.branch, schedule="none")

    def record(self, cfg: Any, mode: str) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": mode,
            "settings": settings_record(cfg),
            "cache": {**s.__dict__, "skip_producer": self.skip.producer, "skip_consumer": self.skip.consumer},
            "model_source": self.loaded.source,
            "weights_fingerprint": self.loaded.fingerprint,
            "num_model_calls": self.num_calls,
            "full_calls": self.full_calls,
            "num_full_calls": len(self.full_calls),
        }


def _cost(p: Prepared, cfg: Any) -> dict[str, Any]:
    out = measure.macs_record(p.loaded, cfg.model, p.settings, p.full_calls, p.num_calls)
    if _value(cfg.run.timing) != "off":
        out.update(measure.timing_record(p.loaded, cfg, p.settings, p.full_calls, p.num_calls))
    return out


def run_cost(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """Schedule, MACs and throughput of the cached sampling loop; no weights needed."""
    p = Prepared(cfg)
    t0 = time.perf_counter()
    record = {**p.record(cfg, "cost"), **_cost(p, cfg)}
    record["wall_time_s"] = time.perf_counter() - t0
    record["environment"] = environment(cfg.run.device)
    return record


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


def _generate_both(
    p: Prepared, cfg: Any, indices: range, pipe: Any
) -> tuple[dict, dict, ImageStore, ImageStore]:
    root = Path(cfg.run.store_dir)
    base_key = generate.store_key(p.loaded, cfg, p.baseline, list(range(p.num_calls)), pipe)
    base_store = ImageStore(root, base_key)
    base = generate.generate(p.loaded, cfg, p.baseline, base_store, indices, pipe, desc="baseline")
    if not p.settings.enabled:
        return base, base, base_store, base_store
    store = ImageStore(root, generate.store_key(p.loaded, cfg, p.settings, p.full_calls, pipe))
    cached = generate.generate(p.loaded, cfg, p.settings, store, indices, pipe, desc=f"N={p.settings.interval}")
    return base, cached, base_store, store


def _indices(cfg: Any) -> range:
    if cfg.run.num_samples < 1:
        raise HarnessError(f"run.num_samples must be >= 1, got {cfg.run.num_samples}")
    if cfg.run.batch_size < 1:
        raise HarnessError(f"run.batch_size must be >= 1, got {cfg.run.batch_size}")
    shards = cfg.run.shards
    shard_range(cfg.run.num_samples, shards, 0)  # validates run.shards
    if cfg.run.shard is None:
        return range(cfg.run.num_samples)
    return shard_range(cfg.run.num_samples, shards, cfg.run.shard)


def run_generate(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """Images only (baseline and cached), into the store; no metrics, no timing."""
    p = Prepared(cfg)
    indices = _indices(cfg)
    base, cached, base_store, store = _generate_both(p, cfg, indices, make_pipeline(cfg))
    return {
        **p.record(cfg, "generate"),
        "num_samples": len(indices),
        "sample_indices": [indices.start, indices.stop],
        "store": str(store.dir),
        "generation_time_s": cached["generation_time_s"],
        "generation": cached,
        "baseline": {"cache": _baseline_cache(p), "store": str(base_store.dir),
                     "generation_time_s": base["generation_time_s"], "generation": base},
        "environment": environment(cfg.run.device),
    }


def run_full(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """Generate (baseline + cached), quality metrics for both, cost; one record."""
    p = Prepared(cfg)
    if cfg.run.shard is not None:
        raise HarnessError("run.shard is for run.mode=generate; run.mode=full needs every sample")
    indices = _indices(cfg)
    evaluate = quality_evaluator(cfg)  # fails before any image is generated
    pipe = make_pipeline(cfg)
    t0 = time.perf_counter()
    base, cached, base_store, store = _generate_both(p, cfg, indices, pipe)
    prompts = pipe.prompts_for(indices)
    q_cached = evaluate(store.load(indices), prompts)
    q_base = q_cached if store is base_store else evaluate(base_store.load(indices), prompts)
    cost_row = _cost(p, cfg)
    record = {
        **p.record(cfg, "full"),
        "num_samples": len(indices),
        "store": str(store.dir),
        "generation_time_s": cached["generation_time_s"],
        "generation": cached,
        **q_cached,
        **cost_row,
    }
    record["baseline"] = {
        "cache": _baseline_cache(p),
        "store": str(base_store.dir),
        "generation_time_s": base["generation_time_s"],
        "generation": base,
        **q_base,
        "macs_paper": cost_row["macs_full_paper"],
        "macs_all": cost_row["macs_full_all"],
        "macs_full_paper": cost_row["macs_full_paper"],
        "macs_predicted_speedup": 1.0,
    }
    if "throughput_baseline" in cost_row:
        record["baseline"].update(
            throughput=cost_row["throughput_baseline"], speedup=1.0,
            timing_method=cost_row["timing_method"], timing_batch_size=cost_row["timing_batch_size"],
        )
    record["wall_time_s"] = time.perf_counter() - t0
    record["environment"] = environment(cfg.run.device)
    return record


def _baseline_cache(p: Prepared) -> dict[str, Any]:
    return {**p.baseline.__dict__, "skip_producer": None, "skip_consumer": None}


def quality_evaluator(cfg: Any) -> Callable[[Any, Any], dict[str, Any]]:
    """``(images, prompts) -> metrics dict`` for this model's quality config: a CLIP
    score (``quality.clip``) or feature metrics (``quality.extractor`` + ``reference``)."""
    q = cfg.model.quality
    if not q:
        raise HarnessError(
            f"model {cfg.model.name} has no quality config (model.quality); use run.mode=generate or cost"
        )
    m = {**OmegaConf.to_container(cfg.metrics, resolve=True), **(q.get("metrics") or {})}
    if q.get("clip") is not None:
        return _clip_evaluator(cfg, m)
    if "is" in m["which"] and cfg.run.num_samples < m["is_split_size"]:
        raise HarnessError(
            f"run.num_samples={cfg.run.num_samples} is smaller than the IS split size "
            f"metrics.is_split_size={m['is_split_size']} (ADM: 5000); lower it or drop 'is' from metrics.which"
        )
    if q.reference is None:
        raise HarnessError(
            f"model {cfg.model.name} needs metrics.reference: the reference batch "
            "(ADM .npz with arr_0, an .npz of mu/sigma, or an image folder)"
        )
    try:
        extractor = instantiate(q.extractor)
        reference = instantiate(q.reference) if OmegaConf.is_dict(q.reference) else q.reference
    except InstantiationException as e:
        reason = str(e.__cause__) if e.__cause__ is not None else str(e).strip().splitlines()[0]
        raise HarnessError(f"model.quality of {cfg.model.name}: {reason}") from None

    def evaluate(images: Any, prompts: Any = None) -> dict[str, Any]:
        from metrics.evaluate import quality_metrics

        try:
            return quality_metrics(
                images, reference, extractor, metrics=tuple(m["which"]), is_split_size=m["is_split_size"],
                k=m["k"], batch_size=m["batch_size"], cache_dir=m["cache_dir"], progress=cfg.run.progress,
                device=m["device"] or cfg.run.device,
            )
        except ValueError as e:
            raise HarnessError(str(e)) from None

    return evaluate


def _clip_evaluator(cfg: Any, m: dict[str, Any]) -> Callable[[Any, Any], dict[str, Any]]:
    from metrics.clip_score import ClipScorer
    from metrics.features import MissingWeightsError

    try:
        scorer = ClipScorer(
            m["clip_model"], m["clip_pretrained"], checkpoint=m["clip_checkpoint"],
            device=m["device"] or cfg.run.device,
        )
    except (MissingWeightsError, RuntimeError) as e:
        raise HarnessError(str(e).strip().splitlines()[0]) from None
    protocol = f"open_clip/{m['clip_model']}/{m['clip_pretrained'] or 'random-init'}"

    def evaluate(images: Any, prompts: Any) -> dict[str, Any]:
        value, record = scorer.score(images, prompts, batch_size=m["batch_size"], progress=cfg.run.progress)
        return {"protocol": protocol, "clip_score": value, **record}

    return evaluate


MODES: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "full": run_full,
    "generate": run_generate,
    "cost": run_cost,
}


def run(cfg: Any, out_dir: str | Path) -> Path:
    """Execute one run described by ``cfg``; returns the path of its ``run.json``."""
    _setup(cfg)
    mode = _value(cfg.run.mode)
    if mode not in MODES:
        raise HarnessError(f"run.mode={mode!r} is not available; valid: {', '.join(MODES)}")
    record = MODES[mode](cfg, Path(out_dir))
    try:
        path = write_record(out_dir, record)
    except OSError as e:
        raise HarnessError(f"cannot write the run record into {out_dir}: {e.strerror}") from None
    print(f"run record: {path}")
    return path
