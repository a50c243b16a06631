"""Every setting checked before any work starts, each failure one line naming the setting.

:func:`check` is cheap (no weights are loaded, nothing is generated): a sweep runs it
on every point before its first job starts (``bench.run.sweeper``), and every run runs it
again first. What only a loaded model can tell (its weights, its scheduler) is
checked by the run itself, still before it generates anything.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile
from pathlib import Path
from typing import Any, get_args, get_origin

import torch
from omegaconf import DictConfig, OmegaConf

from bench.caching.engine import CacheError, skip_table
from bench.caching.schedules import ScheduleError
from bench.core.errors import HarnessError
from bench.core.options import Conditioning, Mode, Weights, value
from bench.run import parts
from bench.run.config import Config
from bench.sampling import loop as sampling


def check(cfg: Any) -> None:
    """Raise :class:`HarnessError` for the first bad setting of ``cfg``."""
    unknown_keys(cfg)
    run_settings(cfg.run)
    cache_settings(cfg)
    model_source(cfg.model)
    if value(cfg.run.mode) == Mode.full:
        metric_files(cfg.metrics)
    if value(cfg.run.mode) != Mode.cost and value(cfg.model.conditioning) == Conditioning.text:
        prompt_source(cfg.run.prompts)


# ---------------------------------------------------------------------------------------------- keys


def unknown_keys(cfg: Any) -> None:
    """Refuse keys the schemas do not define (``+foo=1``, ``+run.speed=2``)."""
    _unknown(cfg, Config, "")


def _unknown(node: Any, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        key = str(key)
        if key == "hydra" and not prefix:
            continue
        if key not in fields:
            where = f" of {prefix[:-1]}" if prefix else ""
            raise HarnessError(f"unknown setting '{prefix}{key}'; valid settings{where}: {', '.join(fields)}")
        sub = _dataclass_of(fields[key].type)
        child = node.get(key) if isinstance(node, DictConfig) else None
        if sub is not None and isinstance(child, DictConfig):
            _unknown(child, sub, f"{prefix}{key}.")


def _dataclass_of(tp: Any) -> type | None:
    if isinstance(tp, str):  # postponed annotations: resolve among the schema classes
        import bench.run.config as c

        tp = eval(tp, vars(c))  # noqa: S307 -- our own annotations
    if get_origin(tp) is not None:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


# --------------------------------------------------------------------------------------------- run


def run_settings(r: Any) -> None:
    def at_least(name: str, low: float, what: str = "") -> None:
        v = r[name]
        if v is None or v < low:
            raise HarnessError(f"run.{name}={v} must be >= {low}{what}")

    at_least("num_samples", 1)
    at_least("batch_size", 1)
    at_least("timing_batch_size", 1)
    at_least("timing_repeats", 2, " (the spread of a speed-up needs two rounds)")
    at_least("timing_warmup", 0)
    at_least("timing_budget_s", 0)
    at_least("timing_loop_max_s", 0)
    if not r.timing_precision > 0:
        raise HarnessError(f"run.timing_precision={r.timing_precision} must be > 0 (e.g. 0.05 for ±5 %)")
    if r.threads is not None and r.threads < 1:
        raise HarnessError(f"run.threads={r.threads} must be >= 1, or null for torch's default")
    if r.timing_threads is not None and r.timing_threads < 1:
        raise HarnessError(f"run.timing_threads={r.timing_threads} must be >= 1, or null for run.threads")
    if not 1 <= r.shards <= r.num_samples:
        raise HarnessError(f"run.shards={r.shards} must be between 1 and run.num_samples={r.num_samples}")
    if r.shard is not None:
        if value(r.mode) == Mode.full:
            raise HarnessError("run.shard is for run.mode=generate; run.mode=full needs every sample")
        if not 0 <= r.shard < r.shards:
            raise HarnessError(f"run.shard={r.shard} must be between 0 and run.shards-1={r.shards - 1}")
    try:
        device = torch.device(r.device)
    except RuntimeError:
        raise HarnessError(f"run.device={r.device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available() and value(r.mode) != Mode.plan:
        raise HarnessError(f"run.device={r.device!r} but CUDA is not available (use run.device=cpu)")


# ------------------------------------------------------------------------------------------- cache


def cache_settings(cfg: Any) -> None:
    """Interval, branch and schedule against the model's architecture and the sampler's calls."""
    settings = parts.cache_settings(cfg.cache, cfg.model, cfg.run.prompts.name)
    num_skips = _num_skips(cfg.model.unet_class, cfg.model.arch)
    if not 1 <= settings.branch <= num_skips:
        raise HarnessError(
            f"cache.branch={settings.branch} is out of range for model {cfg.model.name}: "
            f"valid branches are 1..{num_skips}"
        )
    scheduler = sampling.build_scheduler(parts.sampler_spec(cfg.sampler), _arch_scheduler_config(cfg.model.arch))
    try:
        settings.full_calls(sampling.num_model_calls(scheduler))
    except ScheduleError as e:
        raise HarnessError(str(e)) from None


@functools.lru_cache(maxsize=32)
def _num_skips(unet_class: str, arch: str) -> int:
    from hydra.utils import get_class

    cls = get_class(unet_class)
    with torch.device("meta"):
        unet = cls.from_config(cls.load_config(arch, subfolder="unet"))
    try:
        return len(skip_table(unet))
    except CacheError as e:
        raise HarnessError(str(e)) from None


@functools.lru_cache(maxsize=32)
def _arch_scheduler_config(arch: str) -> dict:
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(arch, subfolder="scheduler"))


# ------------------------------------------------------------------------------------------- model


def model_source(m: Any) -> None:
    """``model.pretrained`` must be a local directory, or a hub id the hub (or its cache) has."""
    if value(m.weights) != Weights.pretrained:
        return
    if OmegaConf.is_missing(m, "pretrained"):
        raise HarnessError(
            f"model {m.name} needs model.pretrained: a local diffusers directory (see docs/models.md), "
            "or use model.weights=random for run.mode=cost"
        )
    where = str(m.pretrained)
    if os.path.isdir(where):
        return
    if where.startswith((".", "~", os.path.sep)) or where.count("/") != 1:  # a hub id is "<org>/<name>"
        raise HarnessError(f"model.pretrained={where!r}: no such directory")
    if _hub_offline() and not _in_hub_cache(where, m.subfolder):
        raise HarnessError(
            f"model.pretrained={where!r} is a Hugging Face hub id that is not in the local cache, and the hub "
            f"is offline (HF_HUB_OFFLINE); download it where the hub is reachable "
            f"(huggingface-cli download {where}) or pass a local directory: model.pretrained=/path/to/{where.split('/')[-1]}"
        )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str, subfolder: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    return isinstance(try_to_load_from_cache(repo_id, filename), str)


# ----------------------------------------------------------------------------------------- metrics


def metric_files(m: Any) -> None:
    """Paths given in ``metrics.*`` exist, and an ``.npz`` reference can be opened."""
    for key in ("reference", "inception_weights", "clip_checkpoint"):
        path = m[key]
        if path is None:
            continue
        p = Path(str(path)).expanduser()
        if not p.exists():
            raise HarnessError(f"metrics.{key}={str(path)!r}: no such file or directory")
        if key == "reference" and p.is_file():
            if p.suffix != ".npz":
                raise HarnessError(f"metrics.reference={str(path)!r} must be an .npz file or an image folder")
            try:
                with zipfile.ZipFile(p) as z:
                    z.namelist()
            except (zipfile.BadZipFile, OSError) as e:
                raise HarnessError(f"metrics.reference={str(path)!r} is not a readable .npz ({e})") from None


def prompt_source(p: Any) -> None:
    if p.source is None:
        raise HarnessError(
            "this model is text-conditioned: set run.prompts.source (a .txt/.json file of prompts, "
            "or a Hugging Face dataset with run.prompts.column)"
        )
    path = Path(str(p.source)).expanduser()
    looks_like_file = path.suffix in (".txt", ".json") or str(p.source).startswith((".", "/", "~"))
    if looks_like_file and not path.exists():
        raise HarnessError(f"run.prompts.source={str(p.source)!r}: no such file")
    if not looks_like_file and p.column is None:
        raise HarnessError(
            f"run.prompts.column is needed to read prompts from the dataset {str(p.source)!r} "
            "(e.g. captions for phiyodr/coco2017, Prompt for nateraw/parti-prompts)"
        )
