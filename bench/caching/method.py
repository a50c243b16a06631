"""The interface every caching method implements (``conf/cache/<name>.yaml``, one module each).

A caching method changes what some model calls of a sampling run compute. Everything
above this layer -- generation, the image store, MACs, timing, records, tables, sweeps --
sees a method only through this interface and names none:

* **Kinds of call.** A method plans a run as one *kind* per model call
  (:class:`Plan`): DeepCache's ``full`` / ``retrieval``, Faster Diffusion's key and
  non-key steps, T-GATE's calls before and after its gate step, Block Caching's set of
  recomputed blocks. A call of kind ``full`` runs the whole U-Net as the uncached model
  does (it may store features on the way); every plan starts with a call that fills
  whatever the later kinds read. MACs are counted once per kind and averaged over the
  plan (:mod:`bench.cost.measure`); the ``calls`` timing times one call of each kind.
* **Attaching.** :meth:`CacheMethod.attach` is a context manager on a U-Net *instance*
  that yields a :class:`Session`: the kinds the current run executed, ``force(kind)``
  (the next calls run as that kind, whatever the plan says: MACs and timing) and
  ``reset()``. The call counter wraps after the plan's number of calls, so consecutive
  runs of the same length need no reset. Leaving the block leaves the U-Net exactly as
  it was.
* **Identity.** :meth:`CacheMethod.key` is the method's part of the image store's key:
  everything that changes the images and nothing else; :meth:`CacheMethod.record` its
  settings as the record's ``cache`` section (the table's setting columns). A method
  whose settings change nothing (:attr:`CacheMethod.enabled` false) keys as the
  uncached model, ``{"schedule": "none"}``, and shares its images.

Adding a method: docs/methods.md.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

FULL = "full"  # the kind of a call that runs the whole U-Net as the uncached model does
UNCACHED_KEY: dict[str, Any] = {"schedule": "none"}  # the store key's cache part of the uncached model


class CacheError(ValueError):
    """Bad caching settings for a given model or sampler (one line, naming the setting)."""


@dataclass(frozen=True)
class Target:
    """What a method is applied to, besides the U-Net and the number of calls.

    ``conditioning``: ``none`` | ``text`` | ``class`` (:class:`bench.core.options.Conditioning`).
    ``guided``: each call carries the unconditional and the conditional half of the batch
    (classifier-free guidance), with identical latents in both halves.
    """

    conditioning: str = "none"
    guided: bool = False


@dataclass(frozen=True)
class Plan:
    """The kind of each model call of one sampling run, and what the record says of it.

    ``columns``: the kinds whose MACs per call the tables show as ``macs_<kind>_g``.
    ``detail``: method-specific facts of the plan for the run record (e.g. DeepCache's
    skip producer and consumer). ``data``: whatever the method's session needs.
    """

    kinds: tuple[str, ...]
    columns: tuple[str, ...] = (FULL,)
    detail: Mapping[str, Any] = field(default_factory=dict)
    data: Any = None

    @property
    def num_calls(self) -> int:
        return len(self.kinds)

    def distinct(self) -> list[str]:
        """The kinds in order of first appearance (the first fills what the others read)."""
        return list(dict.fromkeys(self.kinds))

    def counts(self) -> dict[str, int]:
        """Calls of each kind, in order of first appearance."""
        return dict(Counter(self.kinds))

    @property
    def full_calls(self) -> list[int]:
        """The calls that run the whole U-Net."""
        return [i for i, k in enumerate(self.kinds) if k == FULL]


class Session:
    """One attached method's bookkeeping (see the module docstring).

    Subclasses call :meth:`begin_call` at the start of every model call; it wraps the
    counter after ``plan.num_calls`` calls and returns the kind the call runs as.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.calls = 0
        self.runs = 0
        self.executed: list[str] = []
        self.forced: str | None = None

    def reset(self) -> None:
        """Start a new sampling run (the counter and whatever the method stored)."""
        self.calls = 0
        self.executed = []

    def force(self, kind: str | None) -> None:
        """Run the following calls as ``kind`` (None: follow the plan again)."""
        if kind is not None and kind not in self.plan.kinds and kind != FULL:
            raise CacheError(f"no call of kind {kind!r} in this plan: {', '.join(self.plan.distinct())}")
        self.forced = kind

    def begin_call(self) -> tuple[int, str]:
        if self.calls == self.plan.num_calls and self.plan.num_calls:
            self.reset()
        if self.calls == 0:
            self.runs += 1
        i = self.calls
        kind = self.forced or (self.plan.kinds[i] if i < self.plan.num_calls else FULL)
        return i, kind

    def end_call(self, kind: str) -> None:
        self.executed.append(kind)
        self.calls += 1

    @property
    def executed_full_calls(self) -> list[int]:
        return [i for i, k in enumerate(self.executed) if k == FULL]


class CacheMethod(ABC):
    """A caching method's settings (a frozen dataclass) and what it does with them.

    ``name`` is the method's name in records and tables; the class is the ``_target_`` of
    its ``conf/cache/<name>.yaml``, whose other keys are the dataclass's fields (its knobs).
    Settings errors raise :class:`CacheError` in one line naming ``cache.<knob>``.
    """

    name: ClassVar[str]
    # for the shared method test (tests/test_methods.py) and the docs: an enabled setting in
    # which every knob matters; the knobs that, over it, make the method change nothing; and,
    # per knob, another valid value that changes the images from ``example_knobs``
    example_knobs: ClassVar[dict[str, Any]] = {}
    noop_knobs: ClassVar[dict[str, Any]] = {}
    other_values: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, knobs: Mapping[str, Any], model: Mapping[str, Any], prompt_set: str | None = None
                      ) -> "CacheMethod":
        """The method from its config's knobs; ``model`` (the model's config as a plain
        mapping) supplies per-model defaults where a method has them."""
        cls.check_knobs(knobs)
        return cls(**dict(knobs))

    @classmethod
    def check_knobs(cls, knobs: Mapping[str, Any]) -> None:
        """Refuse a knob the method does not have, naming the ones it has."""
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(knobs) - set(names))
        if unknown:
            raise CacheError(f"cache.{unknown[0]} is not a setting of cache={cls.name}: {', '.join(names)}")

    @property
    @abstractmethod
    def enabled(self) -> bool:
        """False when these settings change nothing: every call is a plain call."""

    def check(self, unet: nn.Module, num_calls: int, target: Target) -> None:
        """Refuse, before any work, a model or sampler the method cannot apply to (a
        :class:`CacheError`). ``unet`` may live on the meta device: only its structure counts."""

    @property
    def needs_calibration(self) -> bool:
        """Whether :meth:`plan` needs ``calibrate`` (a run of the uncached model)."""
        return False

    @abstractmethod
    def plan(self, unet: nn.Module, num_calls: int, target: Target,
             calibrate: Callable[[int], None] | None = None) -> Plan:
        """The kind of each of ``num_calls`` calls. A method that plans from the model's own
        behaviour (:attr:`needs_calibration`) calls ``calibrate(samples)``: one uncached
        sampling loop of the run's sampler over ``samples`` fixed samples (the run's seed,
        random conditioning: :func:`bench.sampling.generate.calibration`), while the
        method's own probes on ``unet`` record what they need."""

    @abstractmethod
    def attach(self, unet: nn.Module, plan: Plan, target: Target) -> contextlib.AbstractContextManager[Session]:
        """Attach to ``unet`` for the duration of a ``with`` block; yields the session."""

    def macs_key(self) -> Any:
        """What the MACs of a call of each kind depend on, besides the architecture (a sweep
        counts them once per value): by default every knob."""
        return self

    @abstractmethod
    def key(self, plan: Plan) -> dict[str, Any]:
        """The image store key's ``cache`` part: what changes the images (when enabled)."""

    def knobs(self) -> dict[str, Any]:
        """The settings, as plain values."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def record(self, plan: Plan) -> dict[str, Any]:
        """The record's ``cache`` section: the method's name, a label, its settings (the
        table's ``method`` and ``setting`` columns, then one column per knob)."""
        return {"method": self.name, "label": self.label(), **self.knobs()}

    def label(self) -> str:
        """The method and its knobs in a few words (summaries, tables, plot legends)."""
        if not self.enabled:
            return "no cache"
        knobs = " ".join(f"{k}={_short(v)}" for k, v in self.knobs().items() if v is not None)
        return f"{self.name} {knobs}".strip()


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


class Uncached(CacheMethod):
    """No caching: every call is a plain call (the baseline of every method)."""

    name = "none"

    @property
    def enabled(self) -> bool:
        return False

    def plan(self, unet, num_calls, target, calibrate=None) -> Plan:
        return Plan((FULL,) * num_calls)

    @contextlib.contextmanager
    def attach(self, unet, plan, target) -> Iterator[Session]:
        session, call = Session(plan), instance_forward(unet)

        def forward(*args: Any, **kwargs: Any) -> Any:
            session.begin_call()
            out = call(*args, **kwargs)
            session.end_call(FULL)
            return out

        with patched([(unet, forward)]):
            yield session

    def key(self, plan: Plan) -> dict[str, Any]:
        return dict(UNCACHED_KEY)

    def record(self, plan: Plan) -> dict[str, Any]:
        return {"method": self.name, "label": "no cache"}


UNCACHED = Uncached()


def instance_forward(unet: nn.Module) -> Callable[..., Any]:
    """The U-Net's own forward: an instance-level one set by someone else, else its class's."""
    previous = unet.__dict__.get("forward")
    if previous is not None:
        return previous
    return lambda *a, **k: type(unet).forward(unet, *a, **k)


@contextlib.contextmanager
def patched(modules: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Set an instance-level ``forward`` on each module for the block, restoring exactly what
    each had (nothing, or someone else's instance forward) afterwards."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in modules]
    try:
        for m, fn in modules:
            m.forward = fn
        yield
    finally:
        for m, prev in saved:
            m.__dict__.pop("forward", None)
            if prev is not None:
                m.forward = prev


def module_view(module: nn.Module, **children: nn.Module | None) -> nn.Module:
    """A shallow view of ``module`` with some child modules replaced.

    Shares parameters, buffers and every other child with ``module``; ``module``
    itself is not modified.
    """
    view = type(module).__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_modules"] = {**module._modules, **children}
    view.__dict__.pop("forward", None)
    for name in children:  # a child that was None is a plain attribute (a U-Net without a mid block)
        view.__dict__.pop(name, None)
    return view


def half_batch(sample: torch.Tensor) -> int:
    """The size of one guidance half of a guided call's batch."""
    if sample.shape[0] % 2:
        raise RuntimeError(f"a guided call's batch of {sample.shape[0]} is not two halves")
    return sample.shape[0] // 2


@dataclass(frozen=True)
class Caching:
    """A method applied to one model and sampler: its settings, its plan and the target."""

    method: CacheMethod
    plan: Plan
    target: Target = Target()

    @property
    def enabled(self) -> bool:
        return self.method.enabled

    def attach(self, unet: nn.Module) -> contextlib.AbstractContextManager[Session]:
        return self.method.attach(unet, self.plan, self.target)

    def key(self) -> dict[str, Any]:
        """The image store key's ``cache`` part (the uncached model's for a no-op setting)."""
        return self.method.key(self.plan) if self.method.enabled else dict(UNCACHED_KEY)

    def record(self) -> dict[str, Any]:
        return {**self.method.record(self.plan), **self.plan.detail}


def apply(method: CacheMethod, unet: nn.Module, num_calls: int, target: Target = Target(),
          calibrate: Callable[[int], None] | None = None) -> Caching:
    """``method`` checked against ``unet`` and ``num_calls`` and planned: a :class:`Caching`."""
    method.check(unet, num_calls, target)
    use = calibrate if method.enabled and method.needs_calibration else None
    if method.enabled and method.needs_calibration and calibrate is None:
        raise CacheError(f"cache={method.name} plans from a calibration run; none was given")
    return Caching(method, method.plan(unet, num_calls, target, use), target)


def uncached(num_calls: int, target: Target = Target()) -> Caching:
    """The uncached model over ``num_calls`` calls (the baseline of every method)."""
    return Caching(UNCACHED, UNCACHED.plan(None, num_calls, target), target)
