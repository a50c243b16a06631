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

from bench.caching.method import CacheError
from bench.core.errors import HarnessError
from bench.core.options import Conditioning, Mode, Weights, value
from bench.run import parts
from bench.run.config import Config, LabelsConfig
from bench.sampling import loop as sampling


def check(cfg: Any) -> None:
    """Raise :class:`HarnessError` for the first bad setting of ``cfg``."""
    unknown_keys(cfg)
    run_settings(cfg.run)
    run_values(cfg)
    sampler_values(cfg)
    cache_settings(cfg)
    model_source(cfg.model)
    if value(cfg.run.mode) == Mode.full:
        metric_files(cfg.metrics)
        quality_values(cfg)
    if value(cfg.run.mode) != Mode.cost and value(cfg.model.conditioning) == Conditioning.text:
        prompt_source(cfg.run.prompts)
        prompt_count(cfg.run.prompts, cfg.run.num_samples)


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


def schema_keys(path: str) -> list[str]:
    """The keys the schema (:class:`bench.run.config.Config`) defines at ``path`` (``""``:
    the top level, ``run.labels``, ...); empty where the schema defines no structure."""
    node: type | None = Config
    for part in [p for p in path.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(node)} if node else {}
        node = _dataclass_of(fields[part].type) if part in fields else None
    return [f.name for f in dataclasses.fields(node)] if node else []


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


def run_values(cfg: Any) -> None:
    """Seed, image store and class labels: values the schema's types let through."""
    r = cfg.run
    if r.seed < 0:
        raise HarnessError(f"run.seed={r.seed} must be an integer >= 0 (numpy's SeedSequence takes no negative seeds)")
    if not str(r.store_dir).strip():
        raise HarnessError("run.store_dir is empty: it must name the image store's directory (default .cache/store)")
    label_values(cfg.model, r)


def label_values(m: Any, r: Any) -> None:
    """``run.labels`` applies to a class-conditional model only; there, its values in range."""
    labels, default = r.labels, LabelsConfig()
    if m.conditioning != "class":
        given = [(k, v) for k, v in (("mode", value(labels.mode)), ("per_class", labels.per_class),
                                     ("list", list(labels.list)))
                 if v != (value(getattr(default, k)) if k == "mode" else getattr(default, k))]
        if given:
            k, v = given[0]
            raise HarnessError(
                f"run.labels.{k}={v} applies to a class-conditional model (model.conditioning=class) only; "
                f"model {m.name} has model.conditioning={m.conditioning}: leave run.labels at its defaults "
                f"(mode={value(default.mode)}, per_class={default.per_class}, list=[])"
            )
        return
    if value(r.mode) == Mode.cost:  # no images, no labels
        return
    mode = value(labels.mode)
    if mode == "per_class" and labels.per_class < 1:
        raise HarnessError(f"run.labels.per_class={labels.per_class} must be >= 1 (samples per class)")
    if mode == "list":
        if len(labels.list) < r.num_samples:
            raise HarnessError(
                f"run.labels.list holds {len(labels.list)} labels; run.num_samples={r.num_samples} needs one per sample"
            )
        negative = sorted({int(y) for y in labels.list if int(y) < 0})
        if negative:
            raise HarnessError(f"run.labels.list holds {negative[:5]}: class labels are >= 0")


# --------------------------------------------------------------------------------------------- sampler


def sampler_values(cfg: Any) -> None:
    """``sampler.eta`` in [0, 1]; ``sampler.steps`` and ``run.baseline_steps`` within the
    model's training timesteps (diffusers refuses more inference steps than that)."""
    eta = cfg.sampler.eta
    if not 0 <= eta <= 1:
        raise HarnessError(
            f"sampler.eta={eta} must be in [0, 1] (DDIM, Song et al. 2021, Eq. 16: 0 is deterministic DDIM, "
            "1 gives DDPM's posterior variance)"
        )
    train = int(_arch_scheduler_config(cfg.model.arch).get("num_train_timesteps", 1000))
    for key, steps in (("sampler.steps", cfg.sampler.steps), ("run.baseline_steps", cfg.run.baseline_steps)):
        if steps is not None and not 1 <= steps <= train:
            raise HarnessError(
                f"{key}={steps} must be between 1 and {train}, the training timesteps of model "
                f"{cfg.model.name} (num_train_timesteps of its scheduler)"
            )


# ------------------------------------------------------------------------------------------- cache


def cache_settings(cfg: Any) -> None:
    """The caching method and its knobs (``cache.*``) against the model's architecture (on the
    meta device) and the sampler's calls: :meth:`bench.caching.method.CacheMethod.check`."""
    method = parts.cache_settings(cfg.cache, cfg.model, cfg.run.prompts.name)
    scheduler = sampling.build_scheduler(parts.sampler_spec(cfg.sampler), _arch_scheduler_config(cfg.model.arch))
    unet = _meta_unet(cfg.model.unet_class, cfg.model.arch)
    try:
        method.check(unet, sampling.num_model_calls(scheduler), parts.target(parts.model_spec(cfg.model)))
    except CacheError as e:
        raise HarnessError(str(e).replace("this model", f"model {cfg.model.name}")) from None


@functools.lru_cache(maxsize=32)
def _meta_unet(unet_class: str, arch: str) -> torch.nn.Module:
    """The model's U-Net built from its shipped config on the meta device (structure only)."""
    from hydra.utils import get_class

    cls = get_class(unet_class)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(arch, subfolder="unet"))


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
    for key in ("reference", "inception_weights", "clip_checkpoint", "lpips_backbone_weights"):
        path = m[key]
        if path is None:
            continue
        p = Path(str(path)).expanduser()
        if not p.exists():
            raise HarnessError(f"metrics.{key}={str(path)!r}: no such file or directory")
        if key == "reference":
            reference_images(str(path))


def reference_images(given: str) -> int | None:
    """The number of images of the reference folder ``metrics.reference`` (None for an
    ``.npz``, which is only opened); refuses a folder without images and an unreadable
    ``.npz``. Computed once per path (and modification), however many sweep points share it."""
    p = Path(given).expanduser()
    st = p.stat()
    count, problem = _reference_scan(str(p.resolve()), st.st_mtime_ns, st.st_size)
    if problem:
        raise HarnessError(f"metrics.reference={given!r} {problem}")
    return count


@functools.lru_cache(maxsize=64)
def _reference_scan(path: str, mtime_ns: int, size: int) -> tuple[int | None, str | None]:
    from metrics.reference import IMAGE_SUFFIXES

    p = Path(path)
    if p.is_dir():
        count = sum(1 for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if count == 0:
            return 0, f"is a folder without images ({', '.join(IMAGE_SUFFIXES)}, searched recursively)"
        return count, None
    if p.suffix != ".npz":
        return None, "must be an .npz file or an image folder"
    try:
        with zipfile.ZipFile(p) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return None, f"is not a readable .npz ({e})"
    return None, None


# quality keys that count something: each must be an integer >= 1
_QUALITY_COUNTS = {
    "is_split_size": "samples per Inception Score split; ADM: 5000",
    "k": "the k-th nearest neighbour of precision/recall, Kynkaanniemi et al. 2019; ADM: 3",
    "batch_size": "images per feature batch",
}


def quality_values(cfg: Any) -> None:
    """``metrics.batch_size`` and the quality config's settings (``conf/quality/*.yaml``:
    ``which``, ``is_split_size``, ``k``, ``batch_size``), checked before any image is
    generated; precision/recall's ``k`` against the generated and reference images."""
    from metrics.evaluate import METRICS

    if not _count(cfg.metrics.batch_size):
        raise HarnessError(f"metrics.batch_size={cfg.metrics.batch_size} must be an integer >= 1")
    q = cfg.quality
    if q is None:
        return
    which = list(q.which) if "which" in q else list(METRICS)
    unknown = [w for w in which if w not in METRICS]
    if unknown:
        raise HarnessError(f"quality.which holds {', '.join(map(str, unknown))}; valid metrics: {', '.join(METRICS)}")
    for key, what in _QUALITY_COUNTS.items():
        if key in q and not _count(q[key]):
            raise HarnessError(f"quality.{key}={q[key]} must be an integer >= 1 ({what})")
    if "k" in q and {"precision", "recall"} & set(which):
        k, n = q.k, cfg.run.num_samples
        if n <= k:
            raise HarnessError(f"quality.k={k}: precision/recall need more than k samples, run.num_samples={n}")
        ref = cfg.metrics.reference
        count = reference_images(str(ref)) if ref is not None and Path(str(ref)).expanduser().is_dir() else None
        if count is not None and count <= k:
            raise HarnessError(
                f"quality.k={k}: precision/recall need more than k reference images, "
                f"metrics.reference={str(ref)!r} holds {count}"
            )


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


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


def prompt_count(p: Any, num_samples: int) -> None:
    """``run.num_samples`` against the prompt set (sample ``i`` takes prompt ``i``): the set is
    read here, before any model is loaded, once per process and source (a sweep's points
    share it)."""
    n = _prompt_count(str(p.source), p.column, p.split, _mtime(str(p.source)))
    if num_samples > n:
        raise HarnessError(
            f"run.num_samples={num_samples} exceeds the {n} prompts of run.prompts.source={str(p.source)!r}: "
            f"set run.num_samples <= {n}"
            + (" (the paper's protocol scores the whole set: run.num_samples=${run.prompts.size})" if p.get("size") else "")
        )


def _mtime(source: str) -> float | None:
    path = Path(source).expanduser()
    return path.stat().st_mtime if path.exists() else None


@functools.lru_cache(maxsize=16)
def _prompt_count(source: str, column: str | None, split: str | None, mtime: float | None) -> int:
    from bench.models.pipelines import load_prompts

    return len(load_prompts(source, column, split))

