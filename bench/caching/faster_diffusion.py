"""Faster Diffusion's encoder propagation on diffusers U-Nets.

Li, Hu et al., "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model
Inference" (arXiv 2312.09608, NeurIPS 2024), Sec. 3 (method): the U-Net's *encoder* changes
little from one step to the next while its *decoder* changes a lot, so the encoder runs only
at *key* steps and the decoder of every other step reuses the encoder features of the last
key step ("encoder propagation").

* The **encoder** is ``conv_in``, every down block and the mid block. A **key call** (kind
  ``full``) runs the whole U-Net, exactly as the uncached model does, and stores the encoder's
  outputs: ``conv_in``'s output, what every down block returned (its output and its residual
  skip tensors) and the mid block's output.
* A **non-key call** (kind ``decoder``) runs the time embedding of the *current* timestep
  (and the class / text embeddings), the up blocks (with the current text embedding in their
  cross-attention) and ``conv_norm_out`` / ``conv_act`` / ``conv_out``, on the stored encoder
  features. ``conv_in``, the down blocks and the mid block are not executed: the call's
  latent only sets the batch and spatial shape. With classifier-free guidance the batch is
  ``[uncond; cond]`` and each half reads the features its own half stored.

Key calls (0-based model-call indices): ``interval`` ``k`` gives ``0, k, 2k, ...`` (the
public code's uniform ``mod=k``; its README recommends 4 for community models); ``key_calls``
lists them instead, e.g. the public code's Stable Diffusion DDIM-50 preset
``{0, 1, 2, 3, 5, 10, 15, 25, 35}`` (``mod='50ls'``, utils_sd.py of hutaiHang/Faster-Diffusion).

Not implemented, on purpose:

* **Prior noise injection** (the paper's ``z_t += 0.003 z_T`` for ``t < 500``) changes the
  sampler's latents, not the U-Net's output. The harness treats the sampling loop as a black
  box and a caching method only changes what model calls compute, so it is left out: our
  images are encoder propagation alone (the paper's no-op for it is ``alpha = 0``).
* **Parallel decoding** (the decoders of the non-key steps after one key step run as one
  batched call, several timesteps at once) computes the same predictions: a non-key step's
  output depends only on the stored features and its timestep, never on the intermediate
  latents. It changes only GPU wall time, and needs several timesteps in one model call,
  which the harness's one-call-per-step loop does not make. Sequential decoder calls here
  give the paper's images (up to batching numerics).

Technique (as DeepCache's engine, :mod:`bench.caching.engine`): the U-Net *instance* gets an
instance-level ``forward`` for the ``with`` block. Key calls run the U-Net's own forward
with forward hooks on the encoder modules, registered for that call only. Decoder calls run
the class's own ``forward`` on a *view* of the U-Net whose ``conv_in`` / ``down_blocks`` /
``mid_block`` are stand-ins returning the stored tensors; the view shares every other module
and parameter, and the real module tree is never mutated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from bench.caching.method import (FULL, CacheError, CacheMethod, Plan, Session, Target, instance_forward,
                                  module_view, patched)

DECODER = "decoder"  # a non-key call: time embedding + decoder on the stored encoder features
SD_DDIM50_KEY_CALLS = (0, 1, 2, 3, 5, 10, 15, 25, 35)  # the public code's '50ls' preset (SD, DDIM 50)
_RESIDUAL_KWARGS = (  # ControlNet / T2I-Adapter residuals: they change the encoder's features
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


@dataclass(frozen=True)
class FasterDiffusion(CacheMethod):
    """Faster Diffusion's encoder propagation (``conf/cache/faster_diffusion.yaml``).

    ``interval``: key calls ``0, interval, 2*interval, ...``; ``key_calls``: the key calls
    themselves (sorted, unique, starting at 0), overriding ``interval``. ``interval`` 1 with
    no ``key_calls`` makes every call a key call: the uncached model.
    """

    interval: int = 4
    key_calls: tuple[int, ...] | None = None

    name = "faster_diffusion"
    example_knobs = {"interval": 3, "key_calls": None}
    noop_knobs = {"interval": 1, "key_calls": None}
    other_values = {"interval": 2, "key_calls": [0, 1, 4]}

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not _is_int(self.interval) or self.interval < 1:
            raise CacheError(f"cache.interval must be an integer >= 1, got {self.interval}")
        object.__setattr__(self, "interval", int(self.interval))
        if self.key_calls is not None:
            object.__setattr__(self, "key_calls", _key_calls(self.key_calls))

    @property
    def enabled(self) -> bool:
        return self.key_calls is not None or self.interval > 1

    def key_call_indices(self, num_calls: int) -> list[int]:
        """The key calls of a run of ``num_calls`` model calls."""
        if self.key_calls is not None:
            if self.key_calls[-1] >= num_calls:
                raise CacheError(f"cache.key_calls={list(self.key_calls)} must lie in [0, {num_calls}) "
                                 f"(the {num_calls} model calls this sampler makes)")
            return list(self.key_calls)
        return list(range(0, num_calls, self.interval))

    # -- the caching-method interface (bench.caching.method) ----------------------------
    def check(self, unet: nn.Module, num_calls: int, target: Target) -> None:
        _check_unet(unet)
        self.key_call_indices(num_calls)

    def plan(self, unet: nn.Module, num_calls: int, target: Target, calibrate: Any = None) -> Plan:
        key = set(self.key_call_indices(num_calls))
        return Plan(tuple(FULL if i in key else DECODER for i in range(num_calls)), columns=(FULL, DECODER))

    @contextlib.contextmanager
    def attach(self, unet: nn.Module, plan: Plan, target: Target) -> Iterator["FasterDiffusionSession"]:
        _check_unet(unet)
        previous = unet.__dict__.get("forward")
        if getattr(previous, "_faster_diffusion", False):
            raise CacheError(f"faster_diffusion is already attached to this {type(unet).__name__}")
        session = FasterDiffusionSession(plan)
        full = instance_forward(unet)
        view, replays = _decoder_view(unet)

        def forward(*args: Any, **kwargs: Any) -> Any:
            _, kind = session.begin_call()
            for name in _RESIDUAL_KWARGS:
                if kwargs.get(name) is not None:
                    raise CacheError(f"faster_diffusion does not support `{name}` (ControlNet/T2I-Adapter "
                                     "residuals change the encoder's features)")
            sample = args[0] if args else kwargs["sample"]
            if kind != FULL and session.stored is None:
                kind = FULL  # nothing stored yet: this call fills it
            if kind == FULL:
                out = _key_call(unet, full, session, tuple(sample.shape), args, kwargs)
            else:
                out = _decoder_call(unet, view, replays, session, tuple(sample.shape), args, kwargs)
            session.end_call(kind)
            return out

        forward._faster_diffusion = True  # type: ignore[attr-defined]
        try:
            with patched([(unet, forward)]):
                yield session
        finally:
            session.stored = None

    def key(self, plan: Plan) -> dict[str, Any]:
        return {"method": self.name, "key_calls": plan.full_calls}

    def label(self) -> str:
        if not self.enabled:
            return "no cache"
        if self.key_calls is not None:
            return f"{self.name} key_calls={','.join(str(i) for i in self.key_calls)}"
        return f"{self.name} interval={self.interval}"


class FasterDiffusionSession(Session):
    """The session of one attached :class:`FasterDiffusion`: ``stored`` holds what the last
    key call's encoder produced (cleared by ``reset()``)."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.stored: _Encoded | None = None

    def reset(self) -> None:
        super().reset()
        self.stored = None

    def force(self, kind: str | None) -> None:
        """Run the following calls as ``full`` (key) or ``decoder`` (None: follow the plan). A
        decoder call reads what the last key call stored (a key call runs when none did)."""
        if kind not in (None, FULL, DECODER):
            raise CacheError(f"faster_diffusion has no call of kind {kind!r}: {FULL}, {DECODER}")
        self.forced = kind


@dataclass
class _Encoded:
    """The encoder's outputs of one key call, and the shape of its latent."""

    shape: tuple[int, ...]
    conv_in: Any
    down: list[Any]
    mid: Any


def _key_call(unet: nn.Module, full: Callable[..., Any], session: FasterDiffusionSession, shape: tuple[int, ...],
              args: tuple, kwargs: dict) -> Any:
    """The uncached forward, with hooks (this call only) keeping the encoder's outputs."""
    got: dict[Any, Any] = {}

    def keep(slot: Any) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            got[slot] = _detached(output)
        return hook

    modules: list[tuple[Any, nn.Module]] = [("conv_in", unet.conv_in)]
    modules += [(b, block) for b, block in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        modules.append(("mid", unet.mid_block))
    handles = [m.register_forward_hook(keep(slot)) for slot, m in modules]
    try:
        out = full(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = [str(slot) for slot, _ in modules if slot not in got]
    if missing:
        raise CacheError(f"faster_diffusion: the U-Net's forward did not run its encoder modules ({', '.join(missing)})")
    session.stored = _Encoded(shape, got["conv_in"], [got[b] for b in range(len(unet.down_blocks))], got.get("mid"))
    return out


def _decoder_call(unet: nn.Module, view: nn.Module, replays: dict[str, Any], session: FasterDiffusionSession,
                  shape: tuple[int, ...], args: tuple, kwargs: dict) -> Any:
    """The class's forward on the view: the encoder's stand-ins return the stored tensors."""
    stored = session.stored
    if shape != stored.shape:
        raise RuntimeError(f"faster_diffusion: a decoder call's latent has shape {list(shape)}, but the key "
                           f"call's had {list(stored.shape)}; call session.reset() between runs")
    replays["conv_in"].value = stored.conv_in
    for replay, value in zip(replays["down"], stored.down):
        replay.value = value
    if replays["mid"] is not None:
        replays["mid"].value = stored.mid
    try:
        return type(unet).forward(view, *args, **kwargs)
    finally:
        for replay in [replays["conv_in"], *replays["down"], replays["mid"]]:
            if replay is not None:
                replay.value = None


class _Replay(nn.Module):
    """Stands in for an encoder module on a decoder call: returns what it returned on the key call."""

    def __init__(self, down_block: bool = False) -> None:
        super().__init__()
        self.down_block = down_block
        self.value: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.down_block:  # (output, skips); a skip-sample block's third output feeds only the down path
            return self.value[0], self.value[1]
        return self.value


def _decoder_view(unet: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    replays: dict[str, Any] = {
        "conv_in": _Replay(),
        "down": [_Replay(down_block=True) for _ in unet.down_blocks],
        "mid": _Replay() if unet.mid_block is not None else None,
    }
    children: dict[str, nn.Module] = {"conv_in": replays["conv_in"], "down_blocks": nn.ModuleList(replays["down"])}
    if replays["mid"] is not None:
        children["mid_block"] = replays["mid"]
    return module_view(unet, **children), replays


def _check_unet(unet: nn.Module) -> None:
    """Refuse a U-Net whose forward is not diffusers' ``UNet2DModel`` / ``UNet2DConditionModel``
    one: decoder calls run that forward on a view and rely on how it calls the encoder."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    forward = getattr(type(unet), "forward", None)
    if forward not in (UNet2DModel.forward, UNet2DConditionModel.forward):
        raise CacheError(f"faster_diffusion supports diffusers UNet2DModel / UNet2DConditionModel, "
                         f"not {type(unet).__name__}")
    if len(unet.down_blocks) == 0 or len(unet.up_blocks) == 0:
        raise CacheError(f"faster_diffusion: this {type(unet).__name__} has no down or up blocks")


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _is_int(value: Any) -> bool:
    try:
        return int(value) == value
    except (TypeError, ValueError):
        return False


def _key_calls(value: Any) -> tuple[int, ...]:
    """``cache.key_calls`` as a tuple, checked for what does not need the number of calls."""
    what = f"cache.key_calls={_plain_list(value)} must be a list of call indices, sorted, unique, starting at 0"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "__iter__"):
        raise CacheError(what)
    items = list(value)
    if not items or any(isinstance(i, bool) or not _is_int(i) for i in items):
        raise CacheError(what)
    calls = tuple(int(i) for i in items)
    if calls[0] != 0 or any(b <= a for a, b in zip(calls, calls[1:])):
        raise CacheError(what)
    return calls


def _plain_list(value: Any) -> Any:
    try:
        return list(value) if not isinstance(value, (str, bytes)) else value
    except TypeError:
        return value
