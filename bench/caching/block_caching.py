"""Block Caching: reuse each U-Net block's output while it barely changes (``cache=block_caching``).

Wimbauer et al., "Cache Me if You Can: Accelerating Diffusion Models through Block
Caching", CVPR 2024 (arXiv 2312.03209). The paper observes that the output of each layer
block of the U-Net changes little between neighbouring solver steps, and reuses "outputs
from layer blocks of previous steps", with a caching schedule determined automatically
"based on each block's changes over timesteps" (abstract; Sec. 3). What is implemented
here is the **training-free part only**:

* **Granularity.** The blocks are the layer blocks of the U-Net's stages: every resnet
  (``resnets[j]``) and every attention / spatial-transformer module (``attentions[j]``)
  inside ``down_blocks``, ``mid_block`` and ``up_blocks``, in a fixed order
  (:func:`unet_blocks`: stage by stage, down, mid, up; in each stage its resnets, then its
  attentions). The paper caches per block of the U-Net's stages (its Fig. 4 shows one
  cache lifetime per spatial-transformer block of LDM); resnets and transformers are
  where a U-Net's compute is, so both are cached here. Down/upsamplers, ``conv_in``,
  the time embedding and ``conv_out`` always run (cheap, and they carry the new input).
  A cached block returns the whole return value of the last call that recomputed it,
  without running: what enters it on that call is ignored.
* **Change metric** (paper Sec. 3, as we read it): for block ``b`` and call ``t`` the
  relative L1 change of its output, ``||o_t - o_{t-1}||_1 / ||o_t||_1``, per sample (each
  row of a call's batch, both guidance halves included) and averaged over the
  ``calibration_samples`` samples of one uncached sampling loop of the run's own sampler
  (``calibrate``, :func:`bench.sampling.generate.calibration`). For a block that returns a
  tuple (a transformer with ``return_dict=False``) the first tensor counts.
* **Schedule** (:func:`recompute_schedule`): call 0 recomputes every block; then, for each
  block, the change since its last recompute is accumulated call by call and the block is
  recomputed at call ``i`` when the accumulated change (including call ``i``'s) exceeds
  ``threshold``, which resets it. One threshold for all blocks: a block that changes fast
  gets short cache lifetimes. The schedule is fixed after calibration (not adaptive per
  sample). This is our reading of the paper: no official code is public and the exact
  formula (and whether the block output is taken with its residual) could not be checked
  against the paper's text; only the abstract, the project page and reviews quoting
  Fig. 4 and the metric's name (relative L1) were reachable.
* **Not implemented:** the paper's scale-shift adjustment (a learned per-block, per-step,
  channel-wise scale and shift applied to cached outputs, trained by distillation from the
  uncached model) needs training; without it the method is plain block reuse on the
  schedule above.

Kinds: a call recomputing every block is ``full`` (it runs exactly as the uncached model);
any other call is ``r<hex>``, the bitmask (bit ``b`` = block ``b`` of :func:`unet_blocks`)
of the blocks it recomputes, e.g. ``r0`` recomputes none. ``threshold: 0`` recomputes
every block every call: a no-op (:attr:`BlockCaching.enabled` false, no calibration).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from bench.caching.method import (
    FULL,
    CacheError,
    CacheMethod,
    Plan,
    Session,
    Target,
    instance_forward,
    patched,
)

NAME = "block_caching"
RECOMPUTE_PREFIX = "r"


def unet_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The cached blocks of a diffusers U-Net, in the fixed order the kinds' bitmasks use:
    ``(path, module)`` for each stage of ``down_blocks``, ``mid_block``, ``up_blocks`` (in
    that order), its ``resnets``, then its ``attentions`` (a ``None`` attention skipped)."""
    stages: list[tuple[str, nn.Module]] = [(f"down_blocks.{i}", b) for i, b in
                                           enumerate(getattr(unet, "down_blocks", None) or [])]
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        stages.append(("mid_block", mid))
    stages += [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(unet, "up_blocks", None) or [])]
    out = []
    for path, stage in stages:
        for group in ("resnets", "attentions"):
            for j, module in enumerate(getattr(stage, group, None) or []):
                if module is not None:
                    out.append((f"{path}.{group}.{j}", module))
    return out


def recompute_schedule(changes: Sequence[Sequence[float]], threshold: float) -> list[frozenset[int]]:
    """The blocks each call recomputes, from each block's change trace.

    ``changes[b][i]``: block ``b``'s relative change at call ``i`` against call ``i - 1``
    (``changes[b][0]`` is not read). Call 0 recomputes every block; block ``b`` is then
    recomputed at call ``i`` when the sum of its changes since its last recompute, call
    ``i``'s included, exceeds ``threshold`` (and the sum restarts from 0). ``threshold``
    <= 0 recomputes every block at every call.
    """
    num_blocks = len(changes)
    num_calls = len(changes[0]) if num_blocks else 0
    if any(len(c) != num_calls for c in changes):
        raise ValueError("every block's change trace must have one value per call")
    out = [set(range(num_blocks)) if i == 0 or threshold <= 0 else set() for i in range(num_calls)]
    if threshold > 0:
        for b, trace in enumerate(changes):
            acc = 0.0
            for i in range(1, num_calls):
                acc += float(trace[i])
                if acc > threshold:
                    out[i].add(b)
                    acc = 0.0
    return [frozenset(s) for s in out]


def kind_of(recomputed: frozenset[int] | set[int], num_blocks: int) -> str:
    """``full`` when every block is recomputed, else ``r<hex bitmask>``."""
    if len(recomputed) == num_blocks:
        return FULL
    return RECOMPUTE_PREFIX + format(sum(1 << b for b in recomputed), "x")


def blocks_of(kind: str, num_blocks: int) -> frozenset[int]:
    """The blocks a call of ``kind`` recomputes (the inverse of :func:`kind_of`)."""
    if kind == FULL:
        return frozenset(range(num_blocks))
    digits = kind[len(RECOMPUTE_PREFIX):]
    if not kind.startswith(RECOMPUTE_PREFIX) or not digits or any(c not in "0123456789abcdef" for c in digits):
        raise CacheError(f"{NAME} has no call of kind {kind!r}: {FULL} or r<hex bitmask of the recomputed blocks>")
    mask = int(digits, 16)
    if mask >> num_blocks:
        raise CacheError(f"block_caching kind {kind!r} names blocks beyond this U-Net's {num_blocks}")
    return frozenset(b for b in range(num_blocks) if mask >> b & 1)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)  # a diffusers output dataclass
    return sample if isinstance(sample, torch.Tensor) else None


def measure_changes(unet: nn.Module, blocks: Sequence[tuple[str, nn.Module]], num_calls: int,
                    run: Callable[[], None]) -> list[list[float]]:
    """Each block's mean relative L1 change per call over whatever ``run()`` samples.

    Forward hooks on the blocks (removed afterwards) compare each output with the same
    block's output at the previous call, per batch row; per call only the sums and the
    number of rows are kept. ``run`` may make any positive multiple of ``num_calls`` U-Net
    calls (consecutive sampling loops); each loop's call 0 starts afresh.
    """
    num_blocks = len(blocks)
    sums: list[list[Any]] = [[0.0] * num_calls for _ in range(num_blocks)]
    rows = [[0] * num_calls for _ in range(num_blocks)]
    prev: list[torch.Tensor | None] = [None] * num_blocks
    calls = [-1]

    def on_call(module: nn.Module, args: Any) -> None:
        calls[0] += 1
        if calls[0] % num_calls == 0:
            prev[:] = [None] * num_blocks

    def probe(b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            o = _first_tensor(out)
            if o is None or calls[0] < 0:
                return
            i, p = calls[0] % num_calls, prev[b]
            if p is not None and p.shape == o.shape:
                o32, p32 = o.detach().float().flatten(1), p.float().flatten(1)
                rel = (o32 - p32).abs().sum(1) / o32.abs().sum(1).clamp_min(torch.finfo(torch.float32).tiny)
                sums[b][i] = sums[b][i] + rel.sum()
                rows[b][i] += rel.shape[0]
            prev[b] = o.detach()
        return hook

    handles = [unet.register_forward_pre_hook(on_call)]
    try:
        handles += [m.register_forward_hook(probe(b)) for b, (_, m) in enumerate(blocks)]
        run()
    finally:
        for h in handles:
            h.remove()
        prev[:] = [None] * num_blocks
    made = calls[0] + 1
    if made <= 0 or made % num_calls:
        raise CacheError(f"cache={NAME}: the calibration run made {made} model calls, "
                         f"not a multiple of the plan's {num_calls}")
    return [[float(s) / n if n else 0.0 for s, n in zip(sums[b], rows[b])] for b in range(num_blocks)]


class BlockSession(Session):
    """The outputs each block stored at its last recompute, and which blocks the current
    call recomputes (``active``; None outside a U-Net call: a block called on its own runs)."""

    def __init__(self, plan: Plan, num_blocks: int):
        super().__init__(plan)
        self.num_blocks = num_blocks
        self.stored: list[Any] = [None] * num_blocks
        self.batch: int | None = None  # the batch size of the stored outputs (None: nothing stored)
        self.active: frozenset[int] | None = None
        self._decoded: dict[str, frozenset[int]] = {}

    def reset(self) -> None:
        super().reset()
        self.stored = [None] * self.num_blocks
        self.batch = None

    def force(self, kind: str | None) -> None:
        if kind is not None:
            self.blocks(kind)  # a kind this U-Net can run
        super().force(kind)

    def begin_call(self) -> tuple[int, str]:
        # a new run of the plan keeps the stored outputs (its call 0 recomputes every block;
        # a forced kind -- MACs, timing -- reads the last ones); reset() drops them
        if self.calls == self.plan.num_calls and self.plan.num_calls:
            self.calls = 0
            self.executed = []
        return super().begin_call()

    def blocks(self, kind: str) -> frozenset[int]:
        if kind not in self._decoded:
            self._decoded[kind] = blocks_of(kind, self.num_blocks)
        return self._decoded[kind]


@dataclass(frozen=True)
class BlockCaching(CacheMethod):
    """Block Caching's settings (``conf/cache/block_caching.yaml``); see the module docstring.

    ``threshold``: the accumulated relative L1 change of a block's output after which it is
    recomputed (0: every block every call, a no-op). ``calibration_samples``: the samples of
    the uncached calibration run the changes are averaged over.
    """

    threshold: float = 0.1
    calibration_samples: int = 4

    name = NAME
    # on the digits model at 8-10 DDIM steps, threshold 0.4 recomputes about 55-67 % of the
    # block calls and 0.6 about 44-53 %; 1 calibration sample moves some recomputes against 2
    example_knobs = {"threshold": 0.4, "calibration_samples": 2}
    noop_knobs = {"threshold": 0.0}
    other_values = {"threshold": 0.6, "calibration_samples": 1}

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise CacheError(f"cache.threshold must be a finite number >= 0 (0: recompute every block every "
                             f"call), got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        n = self.calibration_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CacheError(f"cache.calibration_samples must be an integer >= 1, got {n!r}")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, unet: nn.Module, num_calls: int, target: Target) -> None:
        if not unet_blocks(unet):
            raise CacheError(f"cache={NAME}: {type(unet).__name__} has no resnets or attentions in "
                             "down_blocks / mid_block / up_blocks to cache")

    def plan(self, unet: nn.Module, num_calls: int, target: Target,
             calibrate: Callable[[int], None] | None = None) -> Plan:
        self.check(unet, num_calls, target)
        blocks = unet_blocks(unet)
        paths = tuple(p for p, _ in blocks)
        if not self.enabled or num_calls == 0:
            return Plan((FULL,) * num_calls, data=paths)
        if calibrate is None:
            raise CacheError(f"cache={NAME} plans from a calibration run of the uncached model; "
                             "plan() was given no calibrate")
        changes = measure_changes(unet, blocks, num_calls, lambda: calibrate(self.calibration_samples))
        sets = recompute_schedule(changes, self.threshold)
        kinds = tuple(kind_of(s, len(blocks)) for s in sets)
        fraction = sum(len(s) for s in sets) / (num_calls * len(blocks))
        return Plan(kinds, columns=(FULL,), detail={"recomputed_fraction": round(fraction, 4)}, data=paths)

    @contextlib.contextmanager
    def attach(self, unet: nn.Module, plan: Plan, target: Target) -> Iterator[BlockSession]:
        blocks = unet_blocks(unet)
        if plan.data is not None and tuple(p for p, _ in blocks) != tuple(plan.data):
            raise CacheError(f"cache={NAME}: this plan was made for another U-Net's blocks")
        session = BlockSession(plan, len(blocks))
        call = instance_forward(unet)
        everything = frozenset(range(len(blocks)))

        def forward(*args: Any, **kwargs: Any) -> Any:
            _, kind = session.begin_call()
            sample = args[0] if args else kwargs["sample"]
            if kind == FULL or session.batch is None:  # nothing stored yet: recompute everything
                kind, active = FULL, everything
                session.batch = None
            else:
                if sample.shape[0] != session.batch:
                    raise RuntimeError(
                        f"{NAME}: batch size {sample.shape[0]} on a call of kind {kind}, but the cached block "
                        f"outputs have {session.batch}; call session.reset() between runs")
                active = session.blocks(kind)
            session.active = active
            try:
                out = call(*args, **kwargs)
            finally:
                session.active = None
            if kind == FULL:
                session.batch = sample.shape[0]
            session.end_call(kind)
            return out

        def block_forward(b: int, path: str, module: nn.Module) -> Callable[..., Any]:
            run = instance_forward(module)

            def cached(*args: Any, **kwargs: Any) -> Any:
                active = session.active
                if active is None:
                    return run(*args, **kwargs)
                if b in active:
                    out = run(*args, **kwargs)
                    session.stored[b] = out
                    return out
                if session.stored[b] is None:
                    raise RuntimeError(f"{NAME}: {path} is cached but no call stored its output")
                return session.stored[b]

            return cached

        try:
            with patched([(unet, forward), *((m, block_forward(b, p, m)) for b, (p, m) in enumerate(blocks))]):
                yield session
        finally:
            session.stored = [None] * len(blocks)
            session.batch = None

    def key(self, plan: Plan) -> dict[str, Any]:
        """The knobs and the planned kinds (the schedule calibration derived)."""
        return {"method": NAME, "threshold": self.threshold, "calibration_samples": self.calibration_samples,
                "kinds": list(plan.kinds)}
