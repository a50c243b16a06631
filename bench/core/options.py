"""The names of every multiple-choice setting, defined once.

The Hydra schemas (``bench.run.config``) use these enums, so a wrong value fails at
composition with the valid values listed; the engine, the schedules and the runner
take their valid names from here too.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string enum whose members are the valid values of one setting."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    def __str__(self) -> str:
        return self.value


class Schedule(Choice):
    uniform = "uniform"  # full calls 0, N, 2N, ...
    nonuniform = "nonuniform"  # denser around call c (docs/conventions.md §2)
    none = "none"  # every call full: the uncached baseline


class Ablation(Choice):
    none = "none"  # DeepCache as published
    zeros = "zeros"  # retrieval calls get zeros in place of the stored feature (main paper Table 5)


class Weights(Choice):
    pretrained = "pretrained"  # from_pretrained(model.pretrained): hub id or local directory
    random = "random"  # the shipped architecture, seeded random weights


class Timing(Choice):
    auto = "auto"  # loop on CUDA or when a loop is short, else calls
    loop = "loop"  # whole denoising loops, baseline and cached in alternating rounds
    calls = "calls"  # one full / one retrieval call and the scheduler, composed over the schedule
    off = "off"


class Mode(Choice):
    full = "full"  # generate (baseline + cached), quality metrics, cost
    generate = "generate"  # images only
    cost = "cost"  # no weights needed: schedule, MACs, timing
    plan = "plan"  # what the command would cost (jobs, images, MACs, time, disk); nothing generated


class DType(Choice):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Conditioning(Choice):
    none = "none"  # unconditional
    text = "text"  # prompts through a text encoder (cross-attention context)
    class_ = "class"  # class labels through a learned embedding (one context token)


class Output(Choice):
    pixels = "pixels"  # the loop's samples are images in [-1, 1]
    latents = "latents"  # decoded by model.pipeline


class LabelMode(Choice):
    random = "random"  # uniform over the classes, drawn from sample i's own seed (the paper's protocol)
    per_class = "per_class"  # `per_class` samples of class 0, then of class 1, ... (class-balanced)
    list = "list"  # sample i takes `list[i]`


def value(x) -> str:
    """The plain string of an enum member or a string."""
    return getattr(x, "value", x)


class FidelityMetric(Choice):
    """``metrics.fidelity``: each cached image against the uncached one of the same seed
    (:mod:`metrics.fidelity`)."""

    psnr = "psnr"
    ssim = "ssim"
    lpips = "lpips"


class LpipsNet(Choice):
    """``metrics.lpips_net``: LPIPS' ImageNet backbone (``lpips`` package names)."""

    alex = "alex"
    vgg = "vgg"
