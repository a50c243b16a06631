"""T-GATE: cache the cross-attention output once, then drop cross-attention and CFG.

Liu, Zhang et al., "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion
Models" (arXiv 2404.02747 v1, the T-GATE paper; v2/v3 "Faster Diffusion via Temporal
Attention Decomposition", TMLR 2025). The paper observes that cross-attention output
converges within a few steps: the early *semantics-planning* phase needs the text, the
later *fidelity-improving* phase does not. Its method (T-GATE, v1) therefore splits sampling
at a gate step ``m`` (section numbers were not checked against the paper text here; the
facts below were checked against the public code, tags 0.1.1 and 1.0.0):

* **before the gate** every call is a plain call (classifier-free guidance as usual);
* **at the gate** every cross-attention module runs and its output is stored, averaged
  over the two guidance halves: ``C = (C_uncond + C_cond) / 2`` (the public code's
  ``keep_shape=False`` cache);
* **after the gate** every cross-attention module returns the stored ``C`` without being
  executed, and classifier-free guidance is dropped: the two halves would now be the same
  computation (same latents, cross-attention replaced), so the U-Net runs on one half and
  its output is used directly.

Definitions used here (call indices are 0-based model calls of one sampling run):

* ``gate_step`` g (>= 1) is the paper's gate step with the public code's indexing
  (``tgate_scheduler``: ``cur_step == gate_step - 1`` caches, ``cur_step >= gate_step``
  reuses): the **gate call** is call ``g - 1``, the calls ``g, g+1, ...`` are **gated**.
  g = 10 of 25 steps is the paper's SD-1.5/2.1/XL setting (the package's default).
  There is a gate only when at least one gated call follows it, i.e. ``g < num_calls``;
  ``g >= num_calls`` plans no gate (the gate call would only store) and ``gate_step: null``
  disables T-GATE (the method's no-op with ``deepcache_interval: 1``).
* a **cross-attention module** is a diffusers ``Attention`` with ``is_cross_attention``
  (the ``attn2`` of every transformer block of a text-conditioned U-Net). The stored value
  is the module's whole output; for these modules (``residual_connection`` false,
  ``rescale_output_factor`` 1, both checked) that is the public code's cache point, the
  output of ``to_out``.
* **guided** calls (``Target.guided``) carry ``[uncond; cond]`` with identical latents; a
  gated guided call runs the U-Net on the **first (unconditional) half** of every batched
  input -- the public code feeds the null-text embedding after the gate (the README: "FID
  scores can be slightly improved via null-text embedding in this phase"); with every
  cross-attention replaced, SD's text embedding reaches nothing else -- and returns that
  output duplicated to the full batch, so the loop's guidance formula
  ``e_u + s (e_c - e_u)`` yields it unchanged. MACs of such a call count as half a call
  (:mod:`bench.cost.measure` counts a guided call on both halves and halves it).

**Composition with DeepCache** (the public code's ``TgateSDDeepCacheLoader``): with
``deepcache_interval`` N > 1 the DeepCache engine (:class:`bench.caching.engine.DeepCache`,
paper branch ``deepcache_branch``) is attached as well and every call is forced full or
retrieval by this method's plan. As in the public loop, which resets DeepCache at the gate
call and at the first gated call, both of those are full calls (the gate must execute every
cross-attention; the first gated call has half the batch) and the uniform interval restarts
at the first gated call: before the gate call ``i`` is full when ``i % N == 0``, after it
when ``(i - g) % N == 0``. Retrieval calls before and after the gate read separate stored
features (the batch and the function differ).

Kinds: ``full`` (plain call), ``retrieval`` (DeepCache retrieval), ``gate`` (a plain call
that stores the cross-attention outputs; MACs as ``full``), ``gated`` (whole U-Net, one
guidance half, cross-attention replaced), ``gated+retrieval`` (a DeepCache retrieval call
of the gated regime).

Why not the ``tgate`` package (PyPI 1.0.0): its public API is pipeline-level only
(``pipe.tgate(...)`` is its own copy of the sampling loop: prompt encoding, CFG batching,
scheduler steps), and its attention helper replaces every ``Attention.forward`` with its
own SDPA code (bypassing the installed processor) with no way to undo it, keeping stale
caches on the modules between runs. This harness runs its own loop and must leave the
U-Net exactly as it found it, so the method is implemented here from the paper (facts
checked against the public code, not copied).

T-GATE v2's self-attention caching (``sp_interval`` / ``fi_interval`` / ``warm_up``) is not
implemented: the results are the v1 paper's (cross-attention caching only).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from bench.caching.engine import RETRIEVAL, CacheSettings, DeepCache
from bench.caching.method import (FULL, CacheError, CacheMethod, Plan, Session, Target, half_batch,
                                  instance_forward, patched)

GATE = "gate"
GATED = "gated"
GATED_RETRIEVAL = "gated+retrieval"
KINDS = (FULL, RETRIEVAL, GATE, GATED, GATED_RETRIEVAL)


def cross_attentions(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The cross-attention modules of ``unet`` (diffusers ``Attention`` with ``is_cross_attention``)."""
    return [(name, m) for name, m in unet.named_modules() if getattr(m, "is_cross_attention", False) is True]


@dataclass(frozen=True)
class TGate(CacheMethod):
    """T-GATE's settings (``conf/cache/tgate.yaml``); see the module docstring."""

    gate_step: int | None = 10
    deepcache_interval: int = 1
    deepcache_branch: int = 1

    name = "tgate"
    example_knobs = {"gate_step": 4, "deepcache_interval": 2, "deepcache_branch": 1}
    noop_knobs = {"gate_step": None, "deepcache_interval": 1}
    other_values = {"gate_step": 6, "deepcache_interval": 3, "deepcache_branch": 2}

    def __post_init__(self) -> None:
        g = self.gate_step
        if g is not None and (isinstance(g, bool) or int(g) != g or g < 1):
            raise CacheError(f"cache.gate_step must be an integer >= 1 (the gate call is call gate_step-1; "
                             f"null: no gate), got {g}")
        n = self.deepcache_interval
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise CacheError(f"cache.deepcache_interval must be an integer >= 1 (1: DeepCache off), got {n}")
        b = self.deepcache_branch
        if isinstance(b, bool) or int(b) != b or b < 1:
            raise CacheError(f"cache.deepcache_branch must be an integer >= 1 (DeepCache's paper branch), got {b}")

    @property
    def enabled(self) -> bool:
        return self.gate_step is not None or self.deepcache_interval > 1

    def _deepcache(self) -> CacheSettings:
        return CacheSettings(interval=self.deepcache_interval, branch=self.deepcache_branch)

    def check(self, unet: nn.Module, num_calls: int, target: Target) -> None:
        if target.conditioning != "text":
            raise CacheError(f"cache=tgate caches cross-attention outputs; this model is not text-conditioned "
                             f"(conditioning={target.conditioning})")
        modules = cross_attentions(unet)
        if not modules:
            raise CacheError(f"cache=tgate caches cross-attention outputs; this model has no cross-attention "
                             f"modules ({type(unet).__name__})")
        for name, m in modules:
            if getattr(m, "residual_connection", False) or getattr(m, "rescale_output_factor", 1.0) != 1.0:
                raise CacheError(f"cache=tgate: cross-attention {name} adds its input or rescales its output; "
                                 "only plain cross-attention outputs can be cached")
        if self.deepcache_interval > 1:
            try:
                self._deepcache().check(unet, num_calls, target)
            except CacheError as e:
                raise CacheError(str(e).replace("cache.branch", "cache.deepcache_branch")) from None

    def gate_call(self, num_calls: int) -> int | None:
        """The index of the gate call in a run of ``num_calls`` calls (None: no gate in the run)."""
        g = self.gate_step
        return g - 1 if g is not None and g < num_calls else None

    def kinds(self, num_calls: int) -> tuple[str, ...]:
        gate, n = self.gate_call(num_calls), self.deepcache_interval
        out = []
        for i in range(num_calls):
            if gate is None or i < gate:
                out.append(FULL if i % n == 0 else RETRIEVAL)
            elif i == gate:
                out.append(GATE)
            else:
                out.append(GATED if (i - gate - 1) % n == 0 else GATED_RETRIEVAL)
        return tuple(out)

    def plan(self, unet: nn.Module, num_calls: int, target: Target, calibrate: Any = None) -> Plan:
        gate = self.gate_call(num_calls)
        return Plan(self.kinds(num_calls), columns=(FULL, GATED),
                    detail={"gate_call": gate}, data=gate)

    @contextlib.contextmanager
    def attach(self, unet: nn.Module, plan: Plan, target: Target) -> Iterator["TGateSession"]:
        with contextlib.ExitStack() as stack:
            engine = None
            if self.deepcache_interval > 1:
                engine = DeepCache(unet, self._deepcache()).attach()
                stack.callback(engine.detach)
            session = TGateSession(plan, target, engine)
            inner = instance_forward(unet)
            patches: list[tuple[nn.Module, Callable[..., Any]]] = [(unet, session.forward_fn(inner))]
            for _, m in cross_attentions(unet):
                patches.append((m, session.attention_fn(m)))
            stack.enter_context(patched(patches))
            try:
                yield session
            finally:
                session.clear()

    def key(self, plan: Plan) -> dict[str, Any]:
        return {"method": self.name, "gate_step": self.gate_step, "deepcache_interval": self.deepcache_interval,
                "deepcache_branch": self.deepcache_branch, "kinds": list(plan.kinds)}

    def label(self) -> str:
        if not self.enabled:
            return "no cache"
        what = self.name if self.gate_step is None else f"{self.name} gate_step={self.gate_step}"
        if self.deepcache_interval > 1:
            what += f" + deepcache N={self.deepcache_interval} branch {self.deepcache_branch}"
        return what


class TGateSession(Session):
    """The attached method: the kind of each call, the stored cross-attention outputs and
    DeepCache's stored features per regime (before / after the gate)."""

    def __init__(self, plan: Plan, target: Target, engine: DeepCache | None):
        super().__init__(plan)
        self.target = target
        self.engine = engine
        self.stored: dict[nn.Module, torch.Tensor] = {}  # cross-attention module -> its gate-call output
        self.features: dict[bool, torch.Tensor | None] = {False: None, True: None}  # DeepCache's, per regime
        self._mode: str | None = None  # the running call's cross-attention mode: "store" | "reuse" | None

    def reset(self) -> None:
        super().reset()
        self.clear()

    def clear(self) -> None:
        """Drop whatever the gate and DeepCache stored."""
        self.stored = {}
        self.features = {False: None, True: None}
        if self.engine is not None:
            self.engine.state.stored = None

    def begin_call(self) -> tuple[int, str]:
        # the counter wraps without dropping the stores: a planned run refills each before it
        # reads it (its first call, its gate call, its first gated call), and forced calls
        # (MACs, timing) keep reading what the last call of each filling kind stored
        if self.calls == self.plan.num_calls and self.plan.num_calls:
            Session.reset(self)
        return super().begin_call()

    # -- the U-Net's forward ---------------------------------------------------------------
    def forward_fn(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            _, kind = self.begin_call()
            gated = kind in (GATED, GATED_RETRIEVAL)
            if gated and not self.stored:
                raise RuntimeError("cache=tgate: a gated call before any gate call stored the cross-attention "
                                   "outputs")
            halve = gated and self.target.guided
            if halve:
                sample = args[0] if args else kwargs["sample"]
                n = half_batch(sample)
                args, kwargs = _first_half(args, 2 * n, n), _first_half(kwargs, 2 * n, n)
            retrieval = kind in (RETRIEVAL, GATED_RETRIEVAL)
            engine = self.engine
            if engine is not None:
                engine.state.force(RETRIEVAL if retrieval else FULL)
                engine.state.stored = self.features[gated]
            self._mode = "store" if kind == GATE else "reuse" if gated else None
            try:
                out = inner(*args, **kwargs)
            finally:
                self._mode = None
                if engine is not None:
                    engine.state.force(None)
            if engine is not None:
                self.features[gated] = engine.state.stored
                ran = engine.state.executed[-1]
                engine.state.executed.clear()
                engine.state.full_calls.clear()
                if retrieval and ran == FULL:  # nothing stored for this regime yet: DeepCache ran it whole
                    kind = GATED if gated else FULL
            if halve:
                out = _doubled(out)
            self.end_call(kind)
            return out

        return forward

    def attention_fn(self, module: nn.Module) -> Callable[..., Any]:
        call = instance_forward(module)

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._mode == "reuse":
                stored = self.stored.get(module)
                if stored is None:
                    raise RuntimeError("cache=tgate: no stored output for a cross-attention module")
                if stored.shape[0] != hidden_states.shape[0]:
                    raise RuntimeError(f"cache=tgate: a gated call's batch of {hidden_states.shape[0]}, but the "
                                       f"gate call stored {stored.shape[0]}")
                return stored
            out = call(hidden_states, *args, **kwargs)
            if self._mode == "store":
                kept = out.detach()
                if self.target.guided:
                    u, c = kept.chunk(2)  # [uncond; cond]
                    kept = (u + c) / 2
                self.stored[module] = kept.clone()
            return out

        return forward


def _first_half(x: Any, full: int, half: int) -> Any:
    """Every tensor with a batch of ``full`` in ``x`` (args, kwargs, nested dicts) cut to its first half."""
    if isinstance(x, torch.Tensor):
        return x[:half] if x.ndim and x.shape[0] == full else x
    if isinstance(x, dict):
        return {k: _first_half(v, full, half) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_first_half(v, full, half) for v in x)
    return x


def _doubled(out: Any) -> Any:
    """A U-Net output (diffusers' output dataclass or a tuple) with its sample repeated for both halves."""
    if isinstance(out, torch.Tensor):
        return torch.cat([out, out])
    if isinstance(out, tuple):
        return (torch.cat([out[0], out[0]]), *out[1:])
    sample = out.sample
    return type(out)(sample=torch.cat([sample, sample]))
