"""Every paper table (conf/experiment/*.yaml, found by glob) runs end to end on a stand-in, as
a user runs it, and renders the paper's rows and columns.

Stand-ins: the embedded digits model for the DDPM/LDM-shaped tables, a tiny text-to-image
pipeline built here for the Stable-Diffusion-shaped ones, the real architectures in cost mode
where a table is about cost (Tables 2 and 13). A new experiment file is covered without
editing this test; one that does not render fails it.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from bench.tables import _key, index_columns, paper_table, value_columns
from harness import ROOT, compose_cfg, run_py
from tiny import tiny_sd_pipeline

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("table*.yaml"))
PROMPTS = ["a red bicycle", "a photo of a cat", "two dogs on a beach", "a bowl of soup"]

# the cost-only tables keep their real architectures (random weights, MACs on the meta device)
COST = ["run.mode=cost", "model.weights=random", "run.timing=off"]
DIGITS = ["model=digits", "run.num_samples=4", "run.batch_size=4", "quality.is_split_size=4", "run.timing=off"]
# the speed tables on the tiny architecture: cost mode, two timing rounds
SPEED = ["run.mode=cost", "model.weights=random", "run.timing=calls", "run.timing_repeats=2",
         "run.timing_budget_s=0", "run.timing_warmup=0"]
STANDIN = {
    "table2": COST, "table13": COST,
    # one (c, p) per N: the search tables' rows are the N (and prompt sets), whatever the grid
    "table9": DIGITS + ["cache.center=120", "cache.power=1.2"],
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


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_table_runs_and_renders(name, tiny_sd, tmp_path):
    sweep = tmp_path / "sweep"
    r = run_py("-m", f"experiment={name}", *standin(name, tiny_sd), f"run.store_dir={tmp_path}/store",
               "run.progress=false", f"hydra.sweep.dir={sweep}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    spec = compose_cfg(f"experiment={name}").table
    assert spec is not None and spec.name == name, "an experiment file must describe its table"
    spec = OmegaConf.to_container(spec, resolve=True)
    for suffix in ("csv", "md", "tex"):
        assert (sweep / f"{name}.{suffix}").is_file(), suffix
    table = pd.read_csv(sweep / f"{name}.csv", dtype=str)
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
    assert "Comparable" in (sweep / f"{name}.md").read_text() or not spec.get("comparable")
