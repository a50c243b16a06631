"""MACs counting: what a model call executes, in the paper's and the all-ops convention.

MACs (multiply-accumulates) of the model calls are reported *per image, per model
call, averaged over the run* (full and retrieval calls together), *without* doubling
for classifier-free guidance (``docs/conventions.md`` §3).  The VAE / VQ decoder and
the text encoder are not included -- :func:`count_macs` only counts what the
callable you hand it executes, so pass it the U-Net call alone.  Timing lives in
:mod:`bench.cost.timing`.

MACs conventions (both are always reported, see :class:`MacCount`):

``paper``
    Convolutions (incl. transposed) and linear layers only, i.e. the MACs of the
    ops executed *inside* ``torch.nn`` convolution / ``nn.Linear`` module calls.
    The paper's counter hooks modules and does not count the attention matrix
    products QKᵀ and AV (docs/conventions.md §3).  GroupNorm / LayerNorm / SiLU / softmax /
    element-wise ops contribute 0 here.  Measured with random weights this lands
    within 0.1 % of the paper (docs/conventions.md §3): SD v1.5 U-Net at 512² (latent 64²,
    batch 1, context 77×768) 338.6 G per call (paper 338.83 G); CIFAR-10 DDPM
    U-Net (32², batch 1) 6.05 G (paper 6.1 G).
``all``
    Exactly what :class:`torch.utils.flop_counter.FlopCounterMode` counts
    (FLOPs / 2), i.e. the matrix-multiply-like aten ops ``mm``, ``addmm``,
    ``bmm``, ``baddbmm``, ``_scaled_mm``, ``convolution`` (incl. transposed) and
    the CUDA SDPA kernels (flash / efficient / cuDNN), **plus** a dense SDPA
    formula (:func:`sdpa_macs`) for the SDPA kernels it does not know:
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel that
    ``F.scaled_dot_product_attention`` hits on CPU in float32 *and* float16 --
    FlopCounterMode counts 0 for it), ``_scaled_dot_product_fused_attention_
    overrideable`` and ``_scaled_dot_product_attention_math_for_mps``.  On the
    meta device SDPA decomposes to the math path (two ``bmm``), which gives the
    same number.  On CUDA (checked on an H200, torch 2.11) SDPA hits
    ``_scaled_dot_product_efficient_attention`` in fp32 and
    ``_scaled_dot_product_cudnn_attention`` in fp16/bf16, both counted natively
    and equal to the formula.  Bias additions, norms, activations, softmax and other
    element-wise ops are *not* counted in either convention.  Causal masks are
    ignored (dense count), as in FlopCounterMode.  SD v1.5 ≈ 401.6 G (docs/conventions.md §3).

Both counts are taken in one pass of the real module calls executed by
``fn(*args, **kwargs)`` -- nothing is estimated from architecture formulas.  It
works on the meta device (no memory, no compute: SD v1.5 counts in about a
second) as well as on CPU / CUDA with real or random weights.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "MacCount",
    "count_macs",
    "per_image",
    "average_macs",
    "sdpa_macs",
    "PAPER_MODULE_TYPES",
]

Number = int | float

# Module types whose calls make up the ``paper`` convention (docs/conventions.md §3:
# convolutions + linear layers; ``_ConvNd`` covers Conv1/2/3d and the
# ConvTranspose variants, and subclasses such as diffusers' LoRA-compatible
# layers).  NB: ``nn.MultiheadAttention`` uses its projection weights through
# ``F.multi_head_attention_forward`` without calling its Linear submodules, so
# those projections would only appear in ``all`` (diffusers U-Nets do not use it).
PAPER_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


# --------------------------------------------------------------------------- #
# MacCount
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class MacCount:
    """MACs of one (kind of) model call, in both conventions.

    Attributes
    ----------
    paper:
        Conv + linear MACs (paper convention, docs/conventions.md §3).  ``int`` as measured;
        ``float`` after :func:`per_image` / :func:`average_macs` divisions.
    all:
        All counted MACs incl. attention matrix products (see module docstring).
    by_op:
        Breakdown of ``all`` by aten op (``"aten.convolution"``, ``"aten.addmm"``,
        ``"aten.bmm"``, ``"aten._scaled_dot_product_flash_attention_for_cpu"``...).
        NB: ``F.linear`` on a non-contiguous 3-D input dispatches to ``bmm``, so
        op names do not map one-to-one onto layer kinds; use ``by_module``.
    by_module:
        Breakdown of ``paper`` by module class name (``"Conv2d"``, ``"Linear"``...).
    """

    paper: Number
    all: Number
    by_op: dict[str, Number] = field(default_factory=dict)
    by_module: dict[str, Number] = field(default_factory=dict)

    # ---- derived ---------------------------------------------------------- #
    @property
    def attention(self) -> Number:
        """MACs counted in ``all`` but not in ``paper`` (mostly QKᵀ and AV)."""
        return self.all - self.paper

    @property
    def paper_g(self) -> float:
        """``paper`` in G (1e9) MACs, the unit of the paper's tables."""
        return self.paper / 1e9

    @property
    def all_g(self) -> float:
        """``all`` in G (1e9) MACs."""
        return self.all / 1e9

    # ---- arithmetic (used by per_image / average_macs) -------------------- #
    def scaled(self, factor: Number) -> "MacCount":
        """All fields multiplied by ``factor`` (ints stay ints for int factors)."""
        return MacCount(
            paper=self.paper * factor,
            all=self.all * factor,
            by_op={k: v * factor for k, v in self.by_op.items()},
            by_module={k: v * factor for k, v in self.by_module.items()},
        )

    def __add__(self, other: "MacCount") -> "MacCount":
        if not isinstance(other, MacCount):
            return NotImplemented
        return MacCount(
            paper=self.paper + other.paper,
            all=self.all + other.all,
            by_op=_add_dicts(self.by_op, other.by_op),
            by_module=_add_dicts(self.by_module, other.by_module),
        )

    def __mul__(self, factor: Number) -> "MacCount":
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return self.scaled(factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: Number) -> "MacCount":
        if isinstance(divisor, bool) or not isinstance(divisor, (int, float)):
            return NotImplemented
        if divisor == 0:
            raise ZeroDivisionError("MacCount / 0")
        return MacCount(
            paper=self.paper / divisor,
            all=self.all / divisor,
            by_op={k: v / divisor for k, v in self.by_op.items()},
            by_module={k: v / divisor for k, v in self.by_module.items()},
        )

    @classmethod
    def zero(cls) -> "MacCount":
        return cls(paper=0, all=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (e.g. for results files)."""
        return {
            "paper_macs": self.paper,
            "all_macs": self.all,
            "paper_gmacs": self.paper_g,
            "all_gmacs": self.all_g,
            "by_op": dict(self.by_op),
            "by_module": dict(self.by_module),
        }

    def __str__(self) -> str:
        return f"MacCount(paper={self.paper_g:.3f} G, all={self.all_g:.3f} G)"


def _add_dicts(a: Mapping[str, Number], b: Mapping[str, Number]) -> dict[str, Number]:
    out: dict[str, Number] = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


# --------------------------------------------------------------------------- #
# Counting
# --------------------------------------------------------------------------- #
def sdpa_macs(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """Dense MACs of softmax(Q Kᵀ) V for ``(B, Hq, Lq, E)`` / ``(B, Hkv, Lk, E)`` /
    ``(B, Hkv, Lk, Ev)`` tensors: QKᵀ = B·Hq·Lq·Lk·E plus AV = B·Hq·Lq·Lk·Ev.

    Same count as the two explicit ``bmm`` of the math path (and as
    FlopCounterMode's formula for the CUDA SDPA kernels, FLOPs = 2·MACs).  Grouped
    -query attention (Hkv dividing Hq) is broadcast to Hq heads.  Leading batch
    dims other than one are folded into B.  Causal masking is ignored.
    """
    *qb, hq, lq, e = query_shape
    *kb, hk, lk, e2 = key_shape
    *vb, hv, lv, ev = value_shape
    if e != e2 or lk != lv or hk != hv or hq % hk != 0:
        raise ValueError(f"incompatible SDPA shapes q={tuple(query_shape)} k={tuple(key_shape)} v={tuple(value_shape)}")
    b = math.prod(qb)
    return b * hq * lq * lk * e + b * hq * lq * lk * ev


def _sdpa_flop_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode custom_mapping entry: receives shapes, returns FLOPs.
    return 2 * sdpa_macs(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """SDPA kernels FlopCounterMode (torch 2.14) has no formula for."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",  # CPU, fp32/fp16/bf16
        "_scaled_dot_product_fused_attention_overrideable",  # XPU / out-of-tree backends
        "_scaled_dot_product_attention_math_for_mps",  # Apple MPS
    )
    return {getattr(aten, n): _sdpa_flop_formula for n in names if hasattr(aten, n)}


def _op_name(op: Any) -> str:
    name = getattr(op, "_qualified_op_name", None)  # "aten::convolution"
    if isinstance(name, str):
        return name.replace("::", ".")
    return str(op)


def count_macs(fn: Callable[..., Any], *args: Any, no_grad: bool = True, **kwargs: Any) -> MacCount:
    """Run ``fn(*args, **kwargs)`` once and count the MACs of what it executed.

    Returns a :class:`MacCount` for the whole call (not per image: divide with
    :func:`per_image`).  ``paper`` = MACs of the ops run inside calls of
    :data:`PAPER_MODULE_TYPES` modules (convs incl. transposed, ``nn.Linear``),
    attributed to the outermost such module so nothing is counted twice; ``all``
    = FlopCounterMode's count + the SDPA formula (see the module docstring).
    FLOPs are halved to MACs (FlopCounterMode counts one multiply-add as 2).

    Works on any device.  To count a large model without memory or compute, build
    it on the meta device, e.g.::

        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel.from_config(cfg)
        x = torch.empty(1, 4, 64, 64, device="meta")
        ctx = torch.empty(1, 77, 768, device="meta")
        macs = count_macs(unet, x, torch.tensor([999], device="meta"), ctx)

    On meta, ``F.scaled_dot_product_attention`` decomposes to its math path
    (``bmm``); on CPU it hits ``_scaled_dot_product_flash_attention_for_cpu``,
    for which a formula is registered, so both give the same count.

    Module calls are seen through global ``nn.Module`` forward hooks (only calls
    through ``module(...)`` are seen; the hooks are removed on exit).  ``fn`` runs
    under ``torch.no_grad()`` unless ``no_grad=False``; only the forward pass is
    meant to be counted.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    stack: list[tuple[nn.Module, int]] = []  # (counted module, flops at entry)
    by_module: dict[str, int] = defaultdict(int)

    def pre_hook(module: nn.Module, inputs: Any) -> None:
        if isinstance(module, PAPER_MODULE_TYPES):
            stack.append((module, counter.get_total_flops()))

    def post_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(module, PAPER_MODULE_TYPES):
            if not stack or stack[-1][0] is not module:
                raise RuntimeError("count_macs: unbalanced module hooks")
            _, start = stack.pop()
            if not stack:  # outermost counted module: attribute its ops once
                by_module[type(module).__name__] += counter.get_total_flops() - start

    h_pre = nn.modules.module.register_module_forward_pre_hook(pre_hook)
    h_post = nn.modules.module.register_module_forward_hook(post_hook)
    try:
        with counter:
            if no_grad:
                with torch.no_grad():
                    fn(*args, **kwargs)
            else:
                fn(*args, **kwargs)
    finally:
        h_pre.remove()
        h_post.remove()

    flops_by_op = counter.get_flop_counts().get("Global", {})
    by_op = {_op_name(op): _half(v) for op, v in sorted(flops_by_op.items(), key=lambda kv: _op_name(kv[0]))}
    by_mod = {k: _half(v) for k, v in sorted(by_module.items())}
    return MacCount(
        paper=sum(by_mod.values()),
        all=_half(counter.get_total_flops()),
        by_op=by_op,
        by_module=by_mod,
    )


def _half(flops: int) -> int:
    # Every FlopCounterMode formula is 2 * (integer MACs).
    return flops // 2


def per_image(count: MacCount, batch_size: int, cfg_doubled: bool = False, *, count_guidance: bool = False) -> MacCount:
    """MACs per image of a call that produced ``batch_size`` images.

    With classifier-free guidance the U-Net typically runs on a doubled batch
    (``cfg_doubled=True``: 2·batch_size latents, conditional + unconditional).
    The paper reports MACs per image *without* the CFG doubling (docs/conventions.md §3), i.e.
    the cost of one U-Net sample, so by default the count is divided by
    ``2 * batch_size``.  Pass ``count_guidance=True`` to get the true cost per
    generated image instead (divide by ``batch_size`` only: both CFG passes).
    With ``cfg_doubled=False`` the count is simply divided by ``batch_size``.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    samples = batch_size * (2 if cfg_doubled and not count_guidance else 1)
    return count / samples


def average_macs(full: MacCount, retrieval: MacCount, full_calls: Iterable[int], num_calls: int) -> MacCount:
    """Average MACs per model call over a run (docs/conventions.md §3; Table 1 / Table 13 MACs).

    ``(Σ_{i<num_calls} cost_i) / num_calls`` with ``cost_i = full`` if ``i`` is in
    ``full_calls`` and ``retrieval`` otherwise.  Counting strategy: count one
    full call and one retrieval call with :func:`count_macs` (per image via
    :func:`per_image`), then average here with the engine's list of full calls.
    For uniform N dividing ``num_calls`` this is ``(full + (N−1)·retrieval)/N``
    (e.g. LDM-4-G, DDIM-250: 99.82 G / 4.42 G → 52.1, 36.5, 23.5, 14.0, 9.4 G for
    N = 2, 3, 5, 10, 20, main Table 1 via docs/conventions.md §3).
    """
    if num_calls <= 0:
        raise ValueError("num_calls must be positive")
    full_set = set(int(i) for i in full_calls)
    bad = [i for i in full_set if not 0 <= i < num_calls]
    if bad:
        raise ValueError(f"full_calls outside [0, {num_calls}): {sorted(bad)[:5]}")
    kinds = ["full" if i in full_set else "retrieval" for i in range(num_calls)]
    return plan_average({"full": full, "retrieval": retrieval}, kinds)


def plan_average(per_kind: Mapping[str, MacCount], kinds: Sequence[str]) -> MacCount:
    """Average MACs per model call of a run whose call ``i`` is of kind ``kinds[i]``
    (:class:`bench.caching.method.Plan`): ``Σ_kind n_kind · cost_kind / len(kinds)``, one
    count per kind (DeepCache: :func:`average_macs`)."""
    if not kinds:
        raise ValueError("num_calls must be positive")
    n = Counter(kinds)
    missing = sorted(set(n) - set(per_kind))
    if missing:
        raise ValueError(f"no MAC count for calls of kind {missing[0]!r}")
    total = None
    for k, count in n.items():
        total = per_kind[k] * count if total is None else total + per_kind[k] * count
    return total / len(kinds)
