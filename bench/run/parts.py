"""The config resolved once into the typed parts each lower layer takes.

The Hydra config stays in the run layer (config schemas, checks, runner): the runner
calls :func:`resolve` at the top of a run and hands each layer only its part --
:class:`~bench.models.loading.ModelSpec` to model loading,
:class:`~bench.sampling.loop.SamplerSpec` to the sampling loop,
:class:`~bench.caching.method.CacheMethod` (the ``cache`` method) to the caching layer,
:class:`~bench.sampling.generate.GenerationSpec` to generation,
:class:`~bench.models.pipelines.InputSpec` to the pipelines,
:class:`~bench.cost.measure.TimingSpec` to the cost meters. Parts are frozen: no layer
writes back into the settings, and a variant (the baseline's steps) is a new part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from hydra.utils import get_class

from bench.caching.method import CacheError, CacheMethod, Target
from bench.core.errors import HarnessError, one_line
from bench.core.options import Conditioning, value
from bench.cost.measure import TimingSpec
from bench.models.loading import ModelSpec
from bench.models.pipelines import InputSpec, LabelSpec, PromptSpec
from bench.sampling.generate import GenerationSpec
from bench.sampling.loop import SamplerSpec
from bench.sampling.store import shard_range


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def model_spec(m: Any) -> ModelSpec:
    """``model.*`` (a ``conf/model/*.yaml``); an unset ``model.pretrained`` becomes None."""
    pretrained = None if OmegaConf.is_missing(m, "pretrained") else m.pretrained
    return ModelSpec(
        name=m.name, unet_class=m.unet_class, arch=m.arch, pretrained=None if pretrained is None else str(pretrained),
        subfolder=m.subfolder, scheduler_subfolder=m.scheduler_subfolder, weights=value(m.weights),
        init_seed=int(m.init_seed), conditioning=value(m.conditioning), context_tokens=int(m.context_tokens),
        guidance_scale=float(m.guidance_scale), output=value(m.output), pipeline=m.pipeline,
    )


def sampler_spec(s: Any, steps: int | None = None) -> SamplerSpec:
    """``sampler.*`` (a ``conf/sampler/*.yaml``), at ``steps`` when given."""
    return SamplerSpec(
        name=s.name, scheduler_class=s.scheduler_class, steps=int(s.steps if steps is None else steps),
        eta=float(s.eta), scheduler_kwargs=dict(_plain(s.scheduler_kwargs) or {}),
    )


def cache_settings(c: Any, m: Any, prompt_set: str | None = None) -> CacheMethod:
    """``cache.*`` as its method (``cache._target_``, a :class:`~bench.caching.method.CacheMethod`)
    with its knobs, resolved against the model's defaults (``model.*``) where the method has
    them (DeepCache: the paper's branch and non-uniform parameters per model)."""
    knobs = dict(_plain(c))
    target = knobs.pop("_target_", None)
    if not target:
        raise HarnessError("cache has no _target_: give a caching method, cache=" + "|".join(group_options("cache")))
    try:
        cls = get_class(str(target))
    except (ImportError, AttributeError, ValueError) as e:
        raise HarnessError(f"cache._target_={target}: {one_line(e)}") from None
    if not (isinstance(cls, type) and issubclass(cls, CacheMethod)):
        raise HarnessError(f"cache._target_={target} is not a caching method (bench.caching.method.CacheMethod)")
    try:
        return cls.from_settings(knobs, _plain(m), prompt_set)
    except CacheError as e:
        raise HarnessError(str(e)) from None
    except TypeError as e:
        raise HarnessError(f"cache={cls.name}: {one_line(e)}") from None


def group_options(group: str) -> list[str]:
    """The names of a config group (``conf/<group>/*.yaml``), for one-line errors."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    return [f"<a conf/{group}/*.yaml>"]


def target(model: ModelSpec) -> Target:
    """What a caching method needs to know of the model: its conditioning, and whether its
    calls carry both guidance halves (classifier-free guidance, ``model.guidance_scale`` > 1)."""
    return Target(conditioning=model.conditioning,
                  guided=model.conditioning != Conditioning.none and model.guidance_scale > 1)


def timing_spec(r: Any, device: str | None = None) -> TimingSpec:
    """``run.timing*``; its threads are ``run.timing_threads``, else ``run.threads``."""
    return TimingSpec(
        method=value(r.timing), batch_size=int(r.timing_batch_size), repeats=int(r.timing_repeats),
        warmup=int(r.timing_warmup), precision=float(r.timing_precision), budget_s=float(r.timing_budget_s),
        loop_max_s=float(r.timing_loop_max_s), threads=r.timing_threads or r.threads,
        device=str(device or r.device), seed=int(r.seed),
    )


def input_spec(r: Any) -> InputSpec:
    """``run.seed``, ``run.num_samples``, ``run.prompts``, ``run.labels``."""
    p, lab = r.prompts, r.labels
    return InputSpec(
        seed=int(r.seed), num_samples=int(r.num_samples),
        prompts=PromptSpec(name=p.name, source=None if p.source is None else str(p.source), column=p.column,
                           split=p.split),
        labels=LabelSpec(mode=value(lab.mode), per_class=int(lab.per_class), list=tuple(int(y) for y in lab.list)),
    )


@dataclass(frozen=True)
class Parts:
    """One run's settings as typed parts (see the module docstring)."""

    mode: str
    model: ModelSpec
    sampler: SamplerSpec
    cache: CacheMethod
    generation: GenerationSpec
    inputs: InputSpec
    timing: TimingSpec
    device: str
    dtype: str
    threads: int | None
    num_samples: int
    shards: int
    shard: int | None
    store_dir: str
    baseline_steps: int | None  # the uncached reference's steps (None: the run's own)
    baseline_images: bool

    @property
    def target(self) -> Target:
        return target(self.model)

    @property
    def indices(self) -> range:
        """The sample indices this run covers: all, or its shard's (``run.shard``)."""
        if self.shard is None:
            return range(self.num_samples)
        return shard_range(self.num_samples, self.shards, self.shard)


def resolve(cfg: Any, device: str | None = None) -> Parts:
    """Every part of ``cfg`` (already checked by :func:`bench.run.validate.check`); ``device``
    is the device this process runs on (:func:`bench.run.distributed.setup`), default
    ``run.device``."""
    r = cfg.run
    device = str(device or r.device)
    return Parts(
        mode=value(r.mode),
        model=model_spec(cfg.model),
        sampler=sampler_spec(cfg.sampler),
        cache=cache_settings(cfg.cache, cfg.model, r.prompts.name),
        generation=GenerationSpec(seed=int(r.seed), batch_size=int(r.batch_size), dtype=value(r.dtype),
                                  device=device, progress=bool(r.progress)),
        inputs=input_spec(r),
        timing=timing_spec(r, device),
        device=device,
        dtype=value(r.dtype),
        threads=r.threads,
        num_samples=int(r.num_samples),
        shards=int(r.shards),
        shard=r.shard,
        store_dir=str(r.store_dir),
        baseline_steps=r.get("baseline_steps"),
        baseline_images=bool(r.baseline_images),
    )
