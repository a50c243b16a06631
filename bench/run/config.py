"""Structured configs (typed schemas) for the Hydra entry point.

Registered in Hydra's ConfigStore by the entry point (:func:`bench.cli.register`) so that a
wrong type or an unknown key fails at composition time (struct mode), before any model is built. The YAML files under
``conf/`` extend these schemas; the config group *is* the registry of models and
samplers (a new model is a new YAML file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from bench.core.options import (
    Ablation,
    Conditioning,
    DType,
    FidelityMetric,
    LabelMode,
    LpipsNet,
    Mode,
    Output,
    Schedule,
    Timing,
    Weights,
)


@dataclass
class CacheConfig:
    """DeepCache settings (``conf/cache/deepcache.yaml``). ``branch``/``center``/``power`` left
    null take the model's defaults. Other methods' configs (``conf/cache/<name>.yaml``) have no
    schema here: their class (``_target_``) checks its own knobs (docs/methods.md)."""

    _target_: str = "bench.caching.engine.CacheSettings"
    interval: int = 1
    branch: Optional[int] = None
    schedule: Schedule = Schedule.uniform
    center: Optional[float] = None
    power: Optional[float] = None
    # zeros: retrieval calls get zeros in place of the cached feature (main paper Table 5)
    ablation: Ablation = Ablation.none


@dataclass
class NonUniformParams:
    center: float = 15.0
    power: float = 1.4


@dataclass
class ModelConfig:
    """One model: where its weights come from and the paper's defaults for it."""

    name: str = MISSING
    family: str = MISSING  # ddpm | ldm | sd | digits (labels only, never branched on)
    unet_class: str = MISSING  # e.g. diffusers.UNet2DModel
    pretrained: str = MISSING  # hub id or local diffusers directory
    subfolder: Optional[str] = "unet"
    scheduler_subfolder: Optional[str] = "scheduler"
    arch: str = MISSING  # shipped config directory (unet/ and scheduler/), for weights=random
    weights: Weights = Weights.pretrained
    init_seed: int = 0  # seed for weights=random
    # conditioning of the U-Net: none | text | class; random contexts for cost runs
    conditioning: str = Conditioning.none.value  # a Conditioning value ("class" is a keyword: no enum field)
    context_tokens: int = 0
    guidance_scale: float = 1.0
    default_branch: int = 1
    nonuniform_default: NonUniformParams = field(default_factory=NonUniformParams)
    # per-interval (N) non-uniform hyper-parameters from the paper's tables
    nonuniform_by_interval: dict[int, NonUniformParams] = field(default_factory=dict)
    # the same per prompt set (run.prompts.name), where the paper tuned them per set (Table 10)
    nonuniform_by_prompts: dict[str, dict[int, NonUniformParams]] = field(default_factory=dict)
    # what the sampling loop produces: pixels (images in [-1, 1]) or latents, which
    # `pipeline` (a class path, e.g. bench.models.pipelines.TextToImage) conditions and decodes
    output: Output = Output.pixels
    pipeline: Optional[str] = None


@dataclass
class SamplerConfig:
    name: str = MISSING
    scheduler_class: str = MISSING  # a diffusers scheduler class
    steps: int = 100
    eta: float = 0.0
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptsConfig:
    """Prompts of a text-conditioned model: sample i uses prompt i (conf/prompts/*.yaml)."""

    name: Optional[str] = None  # the prompt set's name, e.g. coco2017 (per-set paper settings, tables)
    source: Optional[str] = None  # .txt (one per line), .json list, or a Hugging Face dataset
    column: Optional[str] = None  # dataset column (lists: first entry), e.g. captions / Prompt
    split: Optional[str] = None
    # how many prompts of the set the paper's protocol scores: the set's own size (COCO 2017
    # validation: 5000 captions; PartiPrompts: 1632); the text-to-image experiments take it as
    # run.num_samples (${run.prompts.size}), so each set is scored whole
    size: Optional[int] = None


@dataclass
class LabelsConfig:
    """Class labels of a class-conditional model (LDM-4-G): the label of sample i
    depends only on (run.seed, i) and these settings, never on batching or shards."""

    mode: LabelMode = LabelMode.random
    per_class: int = 50  # mode per_class: 50 x 1000 classes = a class-balanced 50k
    list: List[int] = field(default_factory=lambda: [])  # mode list: one label per sample


@dataclass
class RunSettings:
    mode: Mode = Mode.full
    seed: int = 0
    num_samples: int = 256
    batch_size: int = 64
    # the uncached reference a run's speed-up and baseline row are measured against: the same
    # sampler at this many steps (null: the run's own steps), e.g. 50 for "speed vs PLMS-50"
    baseline_steps: Optional[int] = None
    # generate and score the baseline's images too; false: the run's own images only (searches;
    # arrays of SLURM jobs, where the baseline is a job of its own, cache.interval=1). Its MACs
    # and speed are still measured.
    baseline_images: bool = True
    shards: int = 1
    shard: Optional[int] = None  # generate only this shard (0-based); null: all of them
    device: str = "cpu"
    dtype: DType = DType.float32
    threads: Optional[int] = None
    store_dir: str = ".cache/store"  # images, keyed by the settings that change them
    save_png: bool = False
    # throughput (bench.cost.timing): rounds alternate baseline and cached; each arm's time
    # is its minimum; rounds are added until the speed-up's 95 % interval is within
    # timing_precision (relative half-width) or timing_budget_s is spent
    timing: Timing = Timing.auto  # auto | loop | calls | off
    timing_batch_size: int = 1
    timing_repeats: int = 5  # rounds at least
    timing_warmup: int = 1
    timing_precision: float = 0.05
    timing_budget_s: float = 30.0
    timing_loop_max_s: float = 0.5  # auto on CPU: time whole loops only when one takes at most this
    # torch threads while timing on a CPU (null: run.threads). One thread by default: a
    # multi-threaded op on a busy machine waits for its slowest thread to be scheduled,
    # which stretches short and long calls unequally and no estimator undoes; a single
    # thread's minimum is its undisturbed time (docs/timing.md, "Numbers on a busy machine")
    timing_threads: Optional[int] = 1
    progress: bool = True
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)


@dataclass
class MetricsConfig:
    """Where the quality metrics find their inputs and where they run (the protocol itself
    is the ``quality`` config)."""

    batch_size: int = 64
    cache_dir: Optional[str] = ".cache/metrics"
    reference: Optional[str] = None  # reference batch: ADM .npz, mu/sigma .npz or image folder
    inception_weights: Optional[str] = None  # local path of the torch-fidelity Inception weights
    clip_model: str = "ViT-g-14"
    clip_pretrained: Optional[str] = "laion2b_s34b_b88k"
    clip_checkpoint: Optional[str] = None  # local open_clip checkpoint
    device: Optional[str] = None  # where features/distances run; null: run.device
    # fidelity of each cached image to the baseline image of the same index (run.mode=full,
    # metrics.fidelity; docs/metrics.md): null = psnr and ssim, plus lpips when its backbone
    # weights are on disk; [] = none. LPIPS asked for by name without weights is refused.
    fidelity: Optional[List[FidelityMetric]] = None
    lpips_net: LpipsNet = LpipsNet.alex
    lpips_backbone_weights: Optional[str] = None  # local torchvision ImageNet weights (alexnet-owt-7be5be79.pth)


@dataclass
class PlotSpec:
    """One figure of a paper table: ``y`` against ``x``, one line per ``series`` value, ours
    solid and the paper's dashed -- on one axis where both quantities are comparable, else
    in panels of their own."""

    x: str = MISSING
    y: str = MISSING
    series: list[str] = field(default_factory=list)
    title: Optional[str] = None
    where: dict[str, Any] = field(default_factory=dict)  # our rows this plot shows (e.g. {model: digits})
    # min | max: which y is better; draws the Pareto front of our points (larger x is better)
    front: Optional[str] = None


@dataclass
class SelectSpec:
    """A search table (supp. Tables 9, 10): per group of ``by``, the run with the best ``best``."""

    by: list[str] = field(default_factory=list)
    best: str = MISSING
    mode: str = "min"  # min | max
    report: list[str] = field(default_factory=list)  # settings of the best run to report


@dataclass
class PanelSpec:
    """One side of a table the paper prints as several tables side by side, joined row by
    row (supp. Table 11: uniform | non-uniform; Tables 14, 15: PLMS steps | DeepCache N).
    ``where`` picks our rows, ``paper_where`` the paper's; they are joined on ``index``
    within the panel. ``show`` are the key columns shown (default: ``index`` less ``pivot``),
    ``label`` a column of the paper's file shown as the row's name, ``values`` which of the
    table's values the panel has (default all), ``pivot`` a setting whose values become
    column groups, with ``pivot_values`` the values of each group (default all)."""

    name: str = MISSING
    title: str = ""
    where: dict[str, Any] = field(default_factory=dict)
    paper_where: dict[str, Any] = field(default_factory=dict)
    index: list[str] = field(default_factory=list)
    show: Optional[list[str]] = None
    label: Optional[str] = None
    values: Optional[list[str]] = None
    pivot: Optional[str] = None
    pivot_values: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TableSpec:
    """How a sweep becomes one of the paper's tables (``bench.report.paper`` renders it).

    Our rows come from the sweep's table.csv (``derived`` adds columns by pandas
    expressions, ``where`` filters them, ``ours_scale`` converts ours to the paper's unit,
    e.g. fractions to the paper's percentages); the paper's from ``results/paper/<paper>``,
    kept as printed (``paper_where`` filters, ``paper_columns`` renames to our names). Both
    are joined on ``index``; each of ``values`` gets ours, the paper's and -- where the two
    are comparable (docs/paper-tables.md) -- the difference. ``pivot`` turns a setting into
    column groups (``groups`` names them, ``pivot_values`` picks each group's values);
    ``panels`` put several such tables side by side; ``show``, ``label`` and ``labels``
    name the rows and key columns. ``speedup_against`` (a row of ours, e.g. ``{model: sd15,
    schedule: none, steps: 50}``) makes the speed-up of other models' rows their throughput
    over that row's (the one with the same ``speedup_within`` values).
    """

    name: str = MISSING
    title: str = ""
    paper: Optional[str] = None
    paper_where: dict[str, Any] = field(default_factory=dict)
    paper_columns: dict[str, str] = field(default_factory=dict)
    paper_protocol: Optional[str] = None
    ours_scale: dict[str, float] = field(default_factory=dict)  # e.g. fractions -> the paper's percent
    where: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    index: list[str] = field(default_factory=list)
    show: Optional[list[str]] = None
    label: Optional[str] = None
    labels: dict[str, str] = field(default_factory=dict)  # headings of key columns
    pivot: Optional[str] = None
    pivot_values: dict[str, list[str]] = field(default_factory=dict)  # the values of each pivot group
    groups: dict[str, str] = field(default_factory=dict)  # headings of pivot values
    panels: list[PanelSpec] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)
    comparable: list[str] = field(default_factory=list)
    speedup_against: dict[str, Any] = field(default_factory=dict)
    speedup_within: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[PlotSpec] = field(default_factory=list)
    select: Optional[SelectSpec] = None


@dataclass
class Config:
    model: ModelConfig = MISSING
    sampler: SamplerConfig = MISSING
    # the caching method: a conf/cache/<name>.yaml, its class `_target_` and its knobs
    # (deepcache's typed by CacheConfig; bench.caching.method)
    cache: Any = MISSING
    run: RunSettings = field(default_factory=RunSettings)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # how images are scored: a conf/quality/*.yaml (instantiated, `_target_`); each model
    # picks one in its defaults list, `quality=<name>` overrides it
    quality: Optional[Any] = None
    # the paper table a sweep renders (set by conf/experiment/table*.yaml)
    table: Optional[TableSpec] = None
