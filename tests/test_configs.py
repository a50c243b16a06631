"""Every file in every config group composes and passes the checks (a new file is covered
without editing this test)."""

from __future__ import annotations

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from bench.run import validate
from harness import ROOT, compose_cfg

CONF = ROOT / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
FILES = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_the_groups_are_the_documented_ones():
    assert {"model", "sampler", "cache", "metrics", "quality", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize("group,name", FILES, ids=[f"{g}={n}" for g, n in FILES])
def test_every_config_composes_and_passes_the_checks(group, name, tmp_path):
    # a caching method on a guided text-to-image model, to which every method applies (T-GATE
    # refuses unconditional models: tests/test_method_tgate.py)
    cfg = compose_cfg(f"{group}={name}", *(["model=sd15"] if group == "cache" else []))
    # no weights on this machine: check the architecture the file describes
    cfg.model.weights = "random"
    if cfg.model.conditioning == "text":  # a stand-in of the prompt set (the hub's cannot be read here)
        (tmp_path / "p.txt").write_text("a prompt\n" * cfg.run.num_samples)  # sample i takes prompt i
        cfg.run.prompts.source = str(tmp_path / "p.txt")
    if cfg.run.mode == "full" and cfg.quality is None:
        pytest.fail(f"{group}={name}: run.mode=full without a quality config")
    validate.check(cfg)
    if cfg.quality is not None:
        get_object(cfg.quality._target_)  # the quality class exists
        OmegaConf.to_container(cfg.quality, resolve=True)  # and its interpolations resolve
    if cfg.model.pipeline is not None:
        get_object(cfg.model.pipeline)


@pytest.mark.parametrize("name", sorted(f.stem for f in (CONF / "model").glob("*.yaml")))
def test_every_model_picks_a_quality_that_can_be_overridden(name):
    cfg = compose_cfg(f"model={name}")
    assert cfg.quality is not None and cfg.quality._target_
    other = compose_cfg(f"model={name}", "quality=clip")
    assert other.quality._target_ == "metrics.clip_score.ClipQuality"


@pytest.mark.parametrize("prompts,n,expect", [
    ("coco2017", 2, (20, 1.3)), ("partiprompts", 2, (15, 1.5)), ("coco2017", 8, (20, 1.3)),
    ("partiprompts", 8, (10, 1.4)), (None, 2, (15, 1.4)),
])
def test_sd_nonuniform_parameters_follow_the_prompt_set(prompts, n, expect):
    """Supp. Table 10 has one (c, p) row per prompt set; another set gets the authors' default."""
    from bench.run import parts

    cfg = compose_cfg("model=sd15", "cache.schedule=nonuniform", f"cache.interval={n}",
                      *([f"prompts={prompts}"] if prompts else []))
    s = parts.cache_settings(cfg.cache, cfg.model, cfg.run.prompts.name)
    assert (s.center, s.power) == expect
