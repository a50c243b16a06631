"""Every paper table (conf/experiment/*.yaml, found by glob) runs end to end on a stand-in and
renders the paper's rows and columns.

Stand-ins: the embedded digits model for the DDPM/LDM-shaped tables, a tiny text-to-image
pipeline built here for the Stable-Diffusion-shaped ones, the real architectures in cost mode
where a table is about cost (Tables 2 and 13). A new experiment file is covered without
editing this test; one that does not render fails it. The sweeps run in this process (the
sweeper's own job expansion, one run per job, then the rendering), so that the tables share
loaded models; test_cli.py runs a table sweep through the command line.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from hydra import compose, initialize_config_dir

from bench.run.runner import run
from bench.run.sweeper import job_overrides
from bench.report.paper import _key, index_columns, paper_table, render, value_columns
from harness import ROOT, compose_cfg
from tiny import tiny_sd_pipeline

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("table*.yaml"))
PROMPTS = ["a red bicycle", "a photo of a cat", "two dogs on a beach", "a bowl of soup"]

# the cost-only tables keep their real architectures (random weights, MACs on the meta device)
COST = ["run.mode=cost", "model.weights=random", "run.timing=off"]
DIGITS = ["model=digits", "run.num_samples=4", "run.batch_size=4", "quality.is_split_size=4", "run.timing=off"]
# the LDM-shaped tables at 100 steps where their centers allow it (Table 7's c reach 200)
FEWER_STEPS = ["sampler.steps=100"]
# the speed tables on the tiny architecture: cost mode, two timing rounds
SPEED = ["run.mode=cost", "model.weights=random", "run.timing=calls", "run.timing_repeats=2",
         "run.timing_budget_s=0", "run.timing_warmup=0"]
STANDIN = {
    "table2": COST, "table13": COST,
    # one (c, p) per N: the search tables' rows are the N (and prompt sets), whatever the grid
    "table1": DIGITS + FEWER_STEPS, "table11": DIGITS + FEWER_STEPS,
    "table8": DIGITS + ["sampler.steps=150"],
    "table9": DIGITS + FEWER_STEPS + ["cache.center=50", "cache.power=1.2"],
    "table10": ["<sd>", "cache.center=15", "cache.power=1.3"],
    "table3": ["<sd>"],
    "table12": ["<sd-arch>", *SPEED], "table14": ["<sd-arch>", *SPEED], "table15": ["<sd-arch>", *SPEED],
}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from metrics.clip_score import ClipScorer

    root = tmp_path_factory.mktemp("t2i")
    tiny_sd_pipeline(root / "build").save_pretrained(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    torch.save(ClipScorer("ViT-S-32", pretrained=None, device="cpu").model.state_dict(), root / "clip.pt")
    return root


def standin(name: str, root) -> list[str]:
    """The overrides that run experiment ``name`` on a stand-in, shrunk (rows are the paper's)."""
    sd = [f"model.pretrained={root}/sd", "model.weights=pretrained", f"run.prompts.source={root}/prompts.txt",
          "run.num_samples=2", "run.batch_size=2", "run.dtype=float32", "run.timing=off",
          "metrics.clip_model=ViT-S-32", "metrics.clip_pretrained=null", f"metrics.clip_checkpoint={root}/clip.pt"]
    arch = [f"model.arch={root}/sd", f"run.prompts.source={root}/prompts.txt", "run.dtype=float32"]
    out = []
    for item in STANDIN.get(name, DIGITS):
        out += sd if item == "<sd>" else arch if item == "<sd-arch>" else [item]
    return out


def sweep(name: str, overrides: list[str], sweep_dir) -> None:
    """``python run.py -m experiment=<name> <overrides>``, in this process."""
    from bench.cli import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sweeper = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True).hydra.sweeper
    params = OmegaConf.to_container(sweeper.params) if sweeper.get("params") else None
    grids = OmegaConf.to_container(sweeper.grids) if sweeper.get("grids") else None
    for i, job in enumerate(job_overrides(params, grids, overrides)):
        run(compose_cfg(f"experiment={name}", *job), sweep_dir / str(i))
    render(sweep_dir)


@pytest.mark.integration
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_table_runs_and_renders(name, tiny_sd, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(name, [*standin(name, tiny_sd), f"run.store_dir={tmp_path}/store", "run.progress=false"], sweep_dir)
    spec = compose_cfg(f"experiment={name}").table
    assert spec is not None and spec.name == name, "an experiment file must describe its table"
    spec = OmegaConf.to_container(spec, resolve=True)
    for suffix in ("csv", "md", "tex"):
        assert (sweep_dir / f"{name}.{suffix}").is_file(), suffix
    table = pd.read_csv(sweep_dir / f"{name}.csv", dtype=str)
    paper = paper_table(spec)
    assert paper is not None and len(paper), f"{name}: no paper numbers"
    index = [c for c in index_columns(spec) if c != spec.get("pivot")]
    # the paper's rows ...
    ours_keys = {tuple(_key(v) for v in row) for row in table[index].itertuples(index=False)}
    paper_keys = {tuple(_key(v) for v in row) for row in paper[index].itertuples(index=False)}
    assert paper_keys <= ours_keys, f"{name}: rows missing: {sorted(paper_keys - ours_keys)[:5]}"
    # ... with our value, the paper's and the difference for every value the paper has
    for v in value_columns(spec):
        if v in paper:
            cols = [c for c in table.columns if c.rpartition("/")[2] in (v, f"{v}_paper", f"{v}_delta")]
            assert len(cols) >= 3, f"{name}: columns of {v}: {cols}"
    # and the rows of ours are filled in (at least one value of ours per paper row)
    ours_cols = [c for c in table.columns if c.rpartition("/")[2] in value_columns(spec)]
    filled = table[ours_cols].notna().any(axis=1)
    assert filled.sum() >= len(paper_keys) * (0.5 if spec.get("pivot") else 1), f"{name}: empty rows"
    assert "Comparable" in (sweep_dir / f"{name}.md").read_text() or not spec.get("comparable")


def test_a_speedup_cell_shows_its_interval_and_the_note_the_timing_threads():
    """A measured speed-up's ± (its relative 95 % half-width) is carried into the table and
    shown in the cell; the note names the threads the timing used, not generation's."""
    from bench.report.paper import merge, notes, to_markdown

    spec = {"name": "t", "index": ["interval"], "values": {"speedup": "Speed", "fid": "FID"}}
    ours = pd.DataFrame({"interval": [2, 5], "speedup": [1.8, 3.5], "speedup_pm": [0.012, float("nan")],
                         "fid": [7.7, 8.7], "timing_method": ["calls", "calls"]})
    paper = pd.DataFrame({"interval": [2, 5], "speedup": [1.7, 3.0], "fid": [4.4, 4.6]})
    table = merge(ours, paper, spec)
    assert list(table.columns) == ["interval", "speedup", "speedup_pm", "speedup_paper", "speedup_delta", "fid",
                                   "fid_paper", "fid_delta"]
    records = [("a", {"status": "ok", "environment": {"device_name": "x86_64", "device": "cpu", "threads": 2},
                      "timing": {"threads": 1}})]
    md = to_markdown(table, spec, notes(spec, ours, records))
    assert "| 1.8 ±1.2 % (1.7; +0.1)" in md and "| 3.5 (3; +0.5)" in md and "7.7 (4.4; +3.3)" in md
    assert "(cpu, 1 thread(s) while timing; timing calls;" in md
