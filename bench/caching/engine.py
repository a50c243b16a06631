"""The DeepCache engine: layer-granular feature caching on diffusers U-Nets.

Paper Algorithm 1 (DeepCache, Ma, Fang, Wang, CVPR 2024, supplementary A). A U-Net
produces skip tensors on its way down and consumes each one in exactly one up-path
resnet. For paper branch ``k`` (skip index ``m = k - 1``):

* a **full call** runs the whole U-Net and stores the main-path tensor that enters
  the consumer of skip ``m``, just before it is concatenated with that skip;
* a **retrieval call** runs only the down path up to the layer that produces skip
  ``m`` and the up path from its consumer to the output, with the stored tensor in
  place of everything deeper. Deeper down layers, the mid block and deeper up layers
  are not executed.

Branch numbering, the skip table and the other numberings in use: docs/conventions.md §1.

The engine attaches to a U-Net *instance*: it sets an instance-level ``forward``
and one forward pre-hook on the consumer resnet; ``detach`` removes both, leaving
the instance exactly as it was. Retrieval calls run the class's own ``forward`` on a
*view* of the U-Net whose ``down_blocks`` / ``up_blocks`` lists are truncated at the
producer / consumer and whose ``mid_block`` returns the stored tensor; the view
shares every parameter with the real model and the real model's module tree is
never mutated.

Usage::

    with deepcache(unet, CacheSettings(interval=5, branch=3), num_calls=100) as state:
        images = sampling_loop(unet, ...)
    state.full_calls  # [0, 5, 10, ...]
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from bench.caching.method import FULL, CacheError, CacheMethod, Plan, Target, module_view
from bench.caching.schedules import SCHEDULES, ScheduleError
from bench.caching.schedules import full_calls as schedule_full_calls
from bench.core.options import Ablation, Schedule

RETRIEVAL = "retrieval"


@dataclass(frozen=True)
class CacheSettings(CacheMethod):
    """DeepCache's settings (``conf/cache/deepcache.yaml``): what to cache and when.

    ``branch`` uses the paper's numbering (1-based): branch ``k`` caches at skip
    index ``k - 1``. Branch 1 runs no down-sampling block and one up-sampling layer.
    ``ablation`` ``zeros`` is the main paper's Table 5 ablation: a retrieval call gets zeros
    of the stored feature's shape in its place (full calls are unchanged).
    """

    interval: int = 1
    branch: int = 1
    schedule: str = Schedule.uniform.value
    center: float | None = None
    power: float | None = None
    ablation: str = Ablation.none.value

    def __post_init__(self) -> None:
        if int(self.interval) != self.interval or self.interval < 1:
            raise CacheError(f"cache.interval must be an integer >= 1, got {self.interval}")
        if self.schedule not in SCHEDULES:
            raise CacheError(
                f"cache.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}"
            )
        if int(self.branch) != self.branch or self.branch < 1:
            raise CacheError(f"cache.branch must be an integer >= 1, got {self.branch}")
        if self.ablation not in Ablation.names():
            raise CacheError(f"cache.ablation={self.ablation!r} is not one of {', '.join(Ablation.names())}")

    @property
    def enabled(self) -> bool:
        return self.schedule != Schedule.none and self.interval > 1

    def full_calls(self, num_calls: int) -> list[int]:
        """Planned full calls of a sampling run of ``num_calls`` model calls."""
        schedule = self.schedule if self.enabled else Schedule.none.value
        return schedule_full_calls(num_calls, self.interval, schedule, self.center, self.power)

    # -- the caching-method interface (bench.caching.method) ----------------------------
    name = "deepcache"
    example_knobs = {"interval": 2, "branch": 2, "schedule": "nonuniform", "center": 4.0, "power": 1.4,
                     "ablation": "none"}
    noop_knobs = {"interval": 1}
    other_values = {"interval": 3, "branch": 1, "schedule": "uniform", "center": 2.0, "power": 2.0,
                    "ablation": "zeros"}

    @classmethod
    def from_settings(cls, knobs: Mapping[str, Any], model: Mapping[str, Any], prompt_set: str | None = None
                      ) -> "CacheSettings":
        """``cache.*`` resolved against the model's paper defaults (``model.*``).

        ``cache.branch`` null -> the model's ``default_branch`` (DDPM 3, LDM 1, SD 2);
        ``cache.center``/``cache.power`` null -> the model's per-interval table for the prompt
        set ``prompt_set`` (supp. Table 10), else its per-interval table (supp. Table 9),
        else its default.
        """
        knobs = dict(knobs)
        cls.check_knobs(knobs)
        schedule = str(knobs.get("schedule", Schedule.uniform.value))
        interval = knobs.get("interval", 1)
        branch = knobs.get("branch")
        branch = model.get("default_branch", 1) if branch is None else branch
        center, power = knobs.get("center"), knobs.get("power")
        if schedule == Schedule.nonuniform and (center is None or power is None):
            by_prompts = model.get("nonuniform_by_prompts") or {}
            table = (by_prompts.get(prompt_set) if prompt_set else None) or model.get("nonuniform_by_interval") or {}
            params = table.get(interval) or model.get("nonuniform_default") or {}
            center = params["center"] if center is None else center
            power = params["power"] if power is None else power
        return cls(interval=interval, branch=branch, schedule=schedule, center=center, power=power,
                   ablation=str(knobs.get("ablation") or Ablation.none.value))

    def check(self, unet: nn.Module, num_calls: int, target: Target) -> None:
        skip_index(self.branch, len(skip_table(unet)))
        if self.power is not None and not (math.isfinite(self.power) and self.power > 1):
            raise CacheError(f"cache.power={self.power} must be a finite number > 1 (the non-uniform schedule's "
                             "power; null: the model's default)")
        if self.center is not None and not 0 <= self.center <= num_calls:
            raise CacheError(f"cache.center={self.center} must lie in [0, {num_calls}] (a model call of the "
                             f"{num_calls} this sampler makes; null: the model's default)")
        try:
            self.full_calls(num_calls)
        except ScheduleError as e:
            raise CacheError(str(e)) from None

    def plan(self, unet: nn.Module, num_calls: int, target: Target, calibrate: Any = None) -> Plan:
        skip = skip_table(unet)[skip_index(self.branch, len(skip_table(unet)))]
        try:
            full = set(self.full_calls(num_calls))
        except ScheduleError as e:
            raise CacheError(str(e)) from None
        kinds = tuple(FULL if i in full else RETRIEVAL for i in range(num_calls))
        return Plan(kinds, columns=(FULL, RETRIEVAL),
                    detail={"skip_producer": skip.producer, "skip_consumer": skip.consumer})

    @contextlib.contextmanager
    def attach(self, unet: nn.Module, plan: Plan, target: Target) -> Iterator["CacheState"]:
        with deepcache(unet, self, num_calls=plan.num_calls) as state:
            yield state

    def macs_key(self) -> Any:
        """A full call and a retrieval call cost the same whatever the schedule: only the branch counts."""
        return (self.name, self.branch)

    def key(self, plan: Plan) -> dict[str, Any]:
        """``branch`` and the planned full calls (and an ablation, only when there is one: the
        keys of existing stores stay as they were)."""
        cache: dict[str, Any] = {"branch": self.branch, "full_calls": plan.full_calls}
        if self.ablation != Ablation.none:
            cache["ablation"] = self.ablation
        return cache

    def record(self, plan: Plan) -> dict[str, Any]:
        """The settings, ``center`` and ``power`` only where they apply (the non-uniform
        schedule), null otherwise -- never a given value that changed nothing. No
        ``method`` key: DeepCache's records and tables stay as they were."""
        section = dict(vars(self))
        if section.get("schedule") != Schedule.nonuniform:
            section["center"] = section["power"] = None
        return section

    def label(self) -> str:
        if not self.enabled:
            return "no cache"
        what = f"{self.schedule} N={self.interval} branch {self.branch}"
        if self.schedule == Schedule.nonuniform:
            what += f" c={self.center:g} p={self.power:g}"
        return what


@dataclass(frozen=True)
class Skip:
    """One skip tensor of a U-Net: who produces it and which up-path resnet consumes it.

    ``index`` is the 0-based skip index in production order (paper branch
    ``index + 1``). ``producer`` / ``consumer`` are module paths in the U-Net.
    """

    index: int
    producer: str
    consumer: str
    down_block: int | None  # None: produced by conv_in
    down_layer: int | None  # resnet index in the down block; None: its downsampler
    up_block: int
    up_layer: int
    skip_channels: int
    main_channels: int  # channels of the stored main-path tensor

    @property
    def branch(self) -> int:
        return self.index + 1


def skip_table(unet: nn.Module) -> list[Skip]:
    """The explicit skip -> (producer, consumer) table of a diffusers U-Net.

    Built from the model's own blocks: skip 0 is ``conv_in``, then one skip per
    down-block layer (each resnet, with its attention if any) and one per
    downsampler. Up blocks pop skips from the end, one per resnet.
    """
    producers: list[tuple[str, int | None, int | None, int]] = [
        ("conv_in", None, None, unet.conv_in.out_channels)
    ]
    for b, block in enumerate(unet.down_blocks):
        _check_block(block, f"down_blocks.{b}")
        for j, resnet in enumerate(block.resnets):
            producers.append((f"down_blocks.{b}.resnets.{j}", b, j, resnet.out_channels))
        if getattr(block, "downsamplers", None) is not None:
            if len(block.downsamplers) != 1:
                raise CacheError(f"down_blocks.{b} has {len(block.downsamplers)} downsamplers")
            ds = block.downsamplers[0]
            producers.append((f"down_blocks.{b}.downsamplers.0", b, None, ds.out_channels))

    consumers: list[tuple[str, int, int, int]] = []
    for u, block in enumerate(unet.up_blocks):
        _check_block(block, f"up_blocks.{u}")
        for r, resnet in enumerate(block.resnets):
            consumers.append((f"up_blocks.{u}.resnets.{r}", u, r, resnet.in_channels))
    if len(consumers) != len(producers):
        raise CacheError(
            f"{type(unet).__name__}: {len(producers)} skips produced but "
            f"{len(consumers)} consumed; not a diffusers skip-connection U-Net"
        )

    table = []
    for m, (producer, b, j, c_skip) in enumerate(producers):
        consumer, u, r, c_in = consumers[len(consumers) - 1 - m]
        if c_in <= c_skip:
            raise CacheError(f"{consumer} takes {c_in} channels, not more than its skip's {c_skip}")
        table.append(Skip(m, producer, consumer, b, j, u, r, c_skip, c_in - c_skip))
    return table


def skip_index(branch: int, num_skips: int) -> int:
    """Paper branch ``k`` (1-based) -> skip index ``k - 1``, checked against the model."""
    if not 1 <= branch <= num_skips:
        raise CacheError(
            f"cache.branch={branch} is out of range for this model: valid branches are 1..{num_skips}"
        )
    return branch - 1


def _check_block(block: nn.Module, path: str) -> None:
    if not hasattr(block, "resnets") or hasattr(block, "skip_conv"):
        raise CacheError(
            f"{path} ({type(block).__name__}) is not a resnet/attention block this engine supports"
        )
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions) != len(block.resnets):
        raise CacheError(f"{path} pairs {len(block.resnets)} resnets with {len(attentions)} attentions")


class _Stored(nn.Module):
    """Stands in for everything deeper than the cached skip: returns the stored tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.tensor: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tensor


@dataclass
class CacheState:
    """Bookkeeping of one attached engine; ``reset()`` starts a new sampling run.

    ``full_calls`` lists the calls of the current run that ran the full network;
    ``plan`` is the schedule's list when ``num_calls`` is known. When ``num_calls``
    is given, the call counter wraps after that many calls, so consecutive sampling
    runs of the same length need no explicit reset.
    """

    settings: CacheSettings
    skip: Skip
    num_calls: int | None
    plan: list[int] | None
    calls: int = 0
    full_calls: list[int] = field(default_factory=list)
    retrieval_calls: int = 0
    runs: int = 0
    stored: torch.Tensor | None = field(default=None, repr=False)
    executed: list[str] = field(default_factory=list)  # the kind of each call of the current run
    forced: str | None = None  # force(): the kind the following calls run as, whatever the plan

    def reset(self) -> None:
        self.calls = 0
        self.full_calls = []
        self.retrieval_calls = 0
        self.executed = []
        self.stored = None

    def force(self, kind: str | None) -> None:
        """Run the following calls as ``full`` or ``retrieval`` (None: follow the plan). A
        retrieval call reads what the last full call stored."""
        if kind not in (None, FULL, RETRIEVAL):
            raise CacheError(f"DeepCache has no call of kind {kind!r}: {FULL}, {RETRIEVAL}")
        self.forced = kind

    @property
    def executed_full_calls(self) -> list[int]:
        return list(self.full_calls)

    def next_is_full(self) -> bool:
        i = self.calls
        if self.forced is not None:
            return self.forced == FULL
        if not self.settings.enabled:
            return True
        if self.plan is not None:
            return i in self._plan_set
        return i % self.settings.interval == 0

    def __post_init__(self) -> None:
        self._plan_set = frozenset(self.plan or ())


class DeepCache:
    """Attach DeepCache to a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``."""

    def __init__(self, unet: nn.Module, settings: CacheSettings, num_calls: int | None = None):
        self.unet = unet
        table = skip_table(unet)
        self.skip = table[skip_index(settings.branch, len(table))]
        plan = None
        if num_calls is not None:
            try:
                plan = settings.full_calls(num_calls)
            except ScheduleError as e:
                raise CacheError(str(e)) from None
        elif settings.enabled and settings.schedule == Schedule.nonuniform:
            raise CacheError("the non-uniform schedule needs num_calls (model calls per run)")
        self.state = CacheState(settings, self.skip, num_calls, plan)
        self._retrieval_unet = self._build_retrievalmodule_view()
        self._handle = None

    # -- attach / detach -------------------------------------------------------
    def attach(self) -> "DeepCache":
        previous = self.unet.__dict__.get("forward")
        if isinstance(getattr(previous, "__self__", None), DeepCache):
            raise CacheError(f"DeepCache is already attached to this {type(self.unet).__name__}")
        # an instance-level forward set by someone else is kept, used for full calls
        # and put back on detach
        self._previous_forward = previous
        consumer = self.unet.get_submodule(self.skip.consumer)
        self._handle = consumer.register_forward_pre_hook(self._capture, with_kwargs=True)
        self.unet.forward = self._forward
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.unet.__dict__.pop("forward", None)
        if self._previous_forward is not None:
            self.unet.forward = self._previous_forward
            self._previous_forward = None
        self.state.stored = None
        self._stored.tensor = None

    # -- the two kinds of call -------------------------------------------------
    def _build_retrievalmodule_view(self) -> nn.Module:
        unet, s = self.unet, self.skip
        down = []
        if s.down_block is not None:
            down = list(unet.down_blocks[: s.down_block])
            block = unet.down_blocks[s.down_block]
            if s.down_layer is None:  # the skip is the downsampler's output
                down.append(block)
            else:
                keep = slice(0, s.down_layer + 1)
                children = {"resnets": nn.ModuleList(block.resnets[keep]), "downsamplers": None}
                if getattr(block, "attentions", None) is not None:
                    children["attentions"] = nn.ModuleList(block.attentions[keep])
                down.append(module_view(block, **children))
        block = unet.up_blocks[s.up_block]
        keep = slice(s.up_layer, None)
        children = {"resnets": nn.ModuleList(block.resnets[keep])}
        if getattr(block, "attentions", None) is not None:
            children["attentions"] = nn.ModuleList(block.attentions[keep])
        up = [module_view(block, **children), *unet.up_blocks[s.up_block + 1 :]]
        self._stored = _Stored()
        return module_view(
            unet,
            down_blocks=nn.ModuleList(down),
            mid_block=self._stored,
            up_blocks=nn.ModuleList(up),
        )

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._full_call and self.state.settings.enabled:
            x = args[0] if args else kwargs["input_tensor"]
            self.state.stored = x[:, : self.skip.main_channels].detach().clone()

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state.num_calls is not None and state.calls == state.num_calls:
            state.reset()
        if state.calls == 0:
            state.runs += 1
        i = state.calls
        self._full_call = state.next_is_full() or state.stored is None
        try:
            if self._full_call:
                if self._previous_forward is not None:
                    out = self._previous_forward(*args, **kwargs)
                else:
                    out = type(self.unet).forward(self.unet, *args, **kwargs)
                state.full_calls.append(i)
                state.executed.append(FULL)
            else:
                self._check_retrieval(args, kwargs)
                self._stored.tensor = state.stored
                if state.settings.ablation == Ablation.zeros:  # main paper Table 5
                    self._stored.tensor = torch.zeros_like(state.stored)
                try:
                    out = type(self.unet).forward(self._retrieval_unet, *args, **kwargs)
                finally:
                    self._stored.tensor = None
                state.retrieval_calls += 1
                state.executed.append(RETRIEVAL)
        finally:
            self._full_call = False
        state.calls += 1
        return out

    def _check_retrieval(self, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[0] != self.state.stored.shape[0]:
            raise RuntimeError(
                f"DeepCache: batch size {sample.shape[0]} on a retrieval call, but the cached "
                f"full call had {self.state.stored.shape[0]}; call state.reset() between runs"
            )
        for key in (
            "down_block_additional_residuals",
            "mid_block_additional_residual",
            "down_intrablock_additional_residuals",
        ):
            if kwargs.get(key) is not None:
                raise CacheError(f"DeepCache does not support `{key}` (ControlNet/adapters)")

    _full_call = False
    _previous_forward = None


@contextlib.contextmanager
def deepcache(
    unet: nn.Module, settings: CacheSettings, num_calls: int | None = None
) -> Iterator[CacheState]:
    """Attach DeepCache for the duration of a ``with`` block; yields the state."""
    engine = DeepCache(unet, settings, num_calls).attach()
    try:
        yield engine.state
    finally:
        engine.detach()
