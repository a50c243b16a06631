"""Every paper table's command, with its file's defaults, passes every up-front check on a
stand-in of its model: a local directory for the weights and, for the text-to-image tables,
stand-in prompt files of each set's real size (PartiPrompts 1,632 lines, COCO 5,000) -- so
the paper's own command cannot fail on a setting after its first job started."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from bench.cli import register
from bench.core.errors import HarnessError
from bench.run.sweeper import job_overrides
from bench.run.validate import check
from harness import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
SIZES = {"partiprompts": 1632, "coco2017": 5000}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("stand_ins")
    (root / "weights").mkdir()
    files = {}
    for name, n in SIZES.items():
        files[name] = root / f"{name}.txt"
        files[name].write_text("".join(f"a stand-in prompt number {i}\n" for i in range(n)))
    return root, files


def _compose(overrides, hydra=False):
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def _values(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) or OmegaConf.is_list(v) else [v]


def _jobs(experiment: str, root: Path) -> list[list[str]]:
    """The sweep's points that put each swept setting at each of its values (the others at
    their first): every value is checked, without the whole product (Table 10: 504 points)."""
    sweeper = _compose([f"experiment={experiment}"], hydra=True).hydra.sweeper
    grids = []
    for grid in sweeper.get("grids") or [{}]:
        first = {k: _values(v)[0] for k, v in grid.items()}
        grids += [{**first, k: x} for k, v in grid.items() for x in _values(v)] or [first]
    swept = {k: _sweep_values(k, v) for k, v in (sweeper.get("params") or {}).items()}
    params = {k: v[0] for k, v in swept.items()}
    variants = [{**params, k: x} for k, v in swept.items() for x in v]
    jobs = job_overrides(params, grids, [])
    for extra in variants:
        jobs += [j for j in job_overrides(extra, grids[:1], []) if j not in jobs]
    return jobs


def _sweep_values(key: str, value) -> list[str]:
    o = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
    return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]


@pytest.mark.integration
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_point_of_every_paper_table_passes_the_checks(experiment, stand_ins):
    root, prompt_files = stand_ins
    jobs = _jobs(experiment, root)
    assert jobs, experiment
    checked = 0
    for job in jobs:
        base = [f"experiment={experiment}", *job]
        cfg = _compose(base)
        extra = []
        if cfg.model.weights == "pretrained" and (OmegaConf.is_missing(cfg.model, "pretrained")
                                                  or not Path(str(cfg.model.pretrained)).is_dir()):
            extra.append(f"model.pretrained={root}/weights")  # the embedded model ships its own
        prompted = cfg.model.conditioning == "text" and cfg.run.mode != "cost"  # cost runs need no prompts
        if prompted:
            extra.append(f"run.prompts.source={prompt_files[cfg.run.prompts.name]}")
        cfg = _compose(base + extra)
        if prompted:
            assert cfg.run.num_samples == SIZES[cfg.run.prompts.name], "each prompt set is scored whole"
        check(cfg)
        checked += 1
    assert checked == len(jobs)


def test_more_samples_than_prompts_is_refused_before_any_model_is_loaded(stand_ins):
    root, files = stand_ins
    cfg = _compose(["experiment=table14", f"model.pretrained={root}/weights", "run.num_samples=5000",
                    f"run.prompts.source={files['partiprompts']}"])
    with pytest.raises(HarnessError, match=r"run.num_samples=5000 exceeds the 1632 prompts of run.prompts.source="):
        check(cfg)
