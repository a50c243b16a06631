"""Every paper table (conf/experiment/*.yaml, found by glob) runs end to end on a stand-in and
renders the paper's rows and columns.

Stand-ins: the embedded digits model for the DDPM/LDM-shaped tables, a tiny text-to-image
pipeline built here for the Stable-Diffusion-shaped ones, the real architectures in cost mode
where a table is about cost (Tables 2 and 13). A new experiment file is covered without
editing this test; one that does not render fails it. The sweeps run in this process (the
sweeper's own job expansion, one run per job, then the rendering), so that the tables share
loaded models; test_cli.py runs a table sweep through the command line.

The layout tests need no runs: the paper's side of every table (its rows and columns, its
numbers exactly as printed) and the rule that a difference is shown only where ours is
comparable with the paper's.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from hydra import compose, initialize_config_dir

from bench.run.runner import run
from bench.run.sweeper import job_overrides
from bench.report.paper import (
    _plain_spec, compared_values, comparability, layout, merge, notes, paper_table, render, to_markdown,
    value_columns,
)
from bench.report.table import SETTING_COLUMNS, write_csv
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


# the paper's layout, as printed: rows of each rendered table (supp. Tables 14, 15: PLMS steps
# beside DeepCache N, 8 rows; Table 11: two halves of 6 rows, each with its baseline)
ROWS = {"table3": 6, "table5": 2, "table6": 3, "table11": 6, "table14": 8, "table15": 8, "table13": 12,
        "table7": 8, "table8": 6, "table1": 8, "table9": 5, "table10": 14, "table12": 4, "table2": 13}


def spec_of(name: str) -> dict:
    return _plain_spec(compose_cfg(f"experiment={name}").table)


def paper_only(spec: dict) -> pd.DataFrame:
    """The rendered table of a sweep with no rows of ours: the paper's layout alone."""
    return layout(pd.DataFrame(), paper_table(spec), spec, set())


def paper_texts(spec: dict) -> set[str]:
    """Every measured number of the paper's file that the table shows, as typed (as printed)."""
    paper, settings = paper_table(spec), _settings(spec)
    return {t for v in value_columns(spec) if v in paper and v not in settings for t in paper[v] if t}


def _settings(spec: dict) -> set[str]:
    """Settings shown as values (Table 6's N) are ours alone; a search table's are the paper's result."""
    return set() if spec.get("select") else set(SETTING_COLUMNS)


def _displayed(md: str) -> str:
    return md.split("\n- ")[0]  # the table, not its notes


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_value_is_shown_exactly_as_printed(name, tmp_path):
    """167.85 stays 167.85 and 200.04 stays 200.04: the paper's cells come from the file's text
    (md, and the csv's ``_paper`` columns), never through float formatting."""
    spec = spec_of(name)
    table = paper_only(spec)
    md = _displayed(to_markdown(table, spec, []))
    texts = paper_texts(spec)
    assert texts, name
    for t in texts:
        assert f"({t})" in md, f"{name}: the paper's {t} is not shown as printed"
    shown = pd.read_csv(write_csv(table, tmp_path / "t.csv"), dtype=str, keep_default_na=False)
    in_csv = {t for c in shown.columns if c.endswith("_paper") and c[:-6].rpartition("/")[2] not in _settings(spec)
              for t in shown[c] if t}
    assert in_csv == texts, name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_table_has_the_papers_rows_and_columns(name):
    spec = spec_of(name)
    table = paper_only(spec)
    assert len(table) == ROWS.get(name, len(table)) and len(table), f"{name}: {len(table)} rows"
    for v in value_columns(spec):
        if v in paper_table(spec):
            assert any(c.rpartition("/")[2] == f"{v}_paper" for c in table.columns), f"{name}: {v}"


def test_table11_has_a_baseline_in_each_half_as_printed():
    spec = spec_of("table11")
    table = paper_only(spec)
    assert list(table["uniform/label"]) == ["Baseline - LDM-4*"] + [f"Uniform - N={n}" for n in (2, 3, 5, 10, 20)]
    assert list(table["nonuniform/label"]) == ["Baseline - LDM-4"] + [f"Non-uniform - N={n}" for n in (2, 3, 5, 10, 20)]
    first = table.iloc[0]
    assert (first["uniform/fid_paper"], first["nonuniform/fid_paper"]) == ("3.37", "3.60")
    assert (first["nonuniform/is_mean_paper"], first["nonuniform/precision_paper"]) == ("247.67", "87.0")
    assert pd.isna(first["nonuniform/sfid_paper"])  # printed as "-"


@pytest.mark.parametrize("name", ["table14", "table15"])
def test_tables_14_and_15_put_plms_steps_beside_deepcache_n(name):
    table = paper_only(spec_of(name))
    assert list(table["plms/steps"]) == ["50", "45", "40", "35", "30", "25", "20", "15"]
    assert list(table["deepcache/interval"]) == [str(n) for n in range(1, 9)]
    assert [c for c in table.columns if not c.endswith(("_paper", "_delta"))] == [
        "plms/steps", "plms/throughput", "plms/speedup", "plms/clip_score", "deepcache/interval",
        "deepcache/uniform/throughput", "deepcache/uniform/speedup", "deepcache/uniform/clip_score",
        "deepcache/nonuniform/clip_score"]
    assert table.iloc[0][["deepcache/uniform/clip_score_paper", "deepcache/nonuniform/clip_score_paper"]].isna().all()


def test_table3_has_the_bk_sdm_rows_with_empty_paper_cells():
    table = paper_only(spec_of("table3"))
    assert list(table["label"]) == ["PLMS-50", "PLMS-25", "BK-SDM-Base", "BK-SDM-Small", "BK-SDM-Tiny", "DeepCache"]
    bk = table[table["label"].str.startswith("BK-SDM")]
    assert bk[[c for c in table.columns if c.endswith("_paper")]].isna().all().all()
    assert "partiprompts/macs_g_paper" in table and "coco2017/macs_g_paper" not in table


def _records(device: str, protocol: str) -> list:
    return [("0", {"status": "ok", "environment": {"device_name": "dev", "device": device, "threads": 2},
                   "timing": {"threads": 1}, "measurements": {"throughput": 1.0, "protocol": protocol}})]


def test_no_difference_on_an_incomparable_column(tmp_path):
    """Δ only where ours is comparable: MACs always; a speed-up only on a GPU; throughput never;
    a quality metric only under the paper's protocol. The csv leaves the others' ``_delta``
    empty, and the note says why once."""
    spec = {"name": "t", "index": ["interval"], "paper_protocol": "adm/inception-v3-compat",
            "values": {"macs_g": "MACs", "throughput": "Throughput", "speedup": "Speed", "fid": "FID"}}
    ours = pd.DataFrame({"interval": [2, 5], "macs_g": [4.2, 3.0], "throughput": [0.5, 0.8], "speedup": [1.8, 3.5],
                         "fid": [7.7, 8.7], "protocol": ["adm/digits-cnn"] * 2, "model": ["digits"] * 2})
    paper = pd.DataFrame({"interval": ["2", "5"], "macs_g": ["4.15", "3.01"], "throughput": ["13.73", "18.11"],
                          "speedup": ["1.40", "1.85"], "fid": ["4.35", "5.73"]})
    for device, protocol, with_delta in [("cpu", "adm/digits-cnn", {"macs_g"}),
                                         ("cuda:0", "adm/inception-v3-compat", {"macs_g", "speedup", "fid"})]:
        records = _records(device, protocol)
        mine = ours.assign(protocol=protocol)
        incomparable = comparability(spec, mine, records)
        table = merge(mine, paper, ["interval"], value_columns(spec), compared_values(spec, incomparable))
        md = to_markdown(table, spec, notes(spec, mine, records, incomparable))
        csv = pd.read_csv(write_csv(table, tmp_path / "t.csv"), dtype=str, keep_default_na=False)
        for v in value_columns(spec):
            assert (csv[f"{v}_delta"] != "").all() == (v in with_delta), (device, v)
        row = _displayed(md).splitlines()[6]
        assert "4.2 (4.15; +0.05)" in row
        assert ("1.8 (1.40; +0.4)" in row) == (device != "cpu") and ("1.8 (1.40)" in row) == (device == "cpu")
        assert "0.5 (13.73)" in row  # throughput: never a difference
        assert ("7.7 (4.35)" in row) == (device == "cpu")
        if device == "cpu":
            assert "FID: not comparable" in md and "adm/digits-cnn" in md and "speed-ups compare only on a GPU" in md


def test_a_speedup_cell_shows_its_interval_and_the_note_the_timing_threads():
    """A measured speed-up's ± (its relative 95 % half-width) is carried into the table and
    shown in the cell; the note names the threads the timing used, not generation's."""
    spec = {"name": "t", "index": ["interval"], "values": {"speedup": "Speed", "fid": "FID"}}
    ours = pd.DataFrame({"interval": [2, 5], "speedup": [1.8, 3.5], "speedup_pm": [0.012, float("nan")],
                         "fid": [7.7, 8.7], "timing_method": ["calls", "calls"]})
    paper = pd.DataFrame({"interval": ["2", "5"], "speedup": ["1.7", "3.0"], "fid": ["4.4", "4.6"]})
    table = merge(ours, paper, ["interval"], value_columns(spec), {"speedup", "fid"})
    assert list(table.columns) == ["interval", "speedup", "speedup_pm", "speedup_paper", "speedup_delta", "fid",
                                   "fid_paper", "fid_delta"]
    records = [("a", {"status": "ok", "environment": {"device_name": "x86_64", "device": "cpu", "threads": 2},
                      "timing": {"threads": 1}})]
    md = to_markdown(table, spec, notes(spec, ours, records))
    assert "| 1.8 ±1.2 % (1.7; +0.1)" in md and "| 3.5 (3.0; +0.5)" in md and "7.7 (4.4; +3.3)" in md
    assert "(cpu, 1 thread(s) while timing; timing calls;" in md


def test_a_speedup_below_one_is_explained():
    spec = {"name": "t", "index": ["branch"], "values": {"speedup": "Speed"}}
    ours = pd.DataFrame({"branch": [10, 11], "speedup": [0.99, 0.96], "speedup_low": [0.95, 0.955],
                         "speedup_high": [1.02, 0.97], "macs_predicted_speedup": [1.02, 1.016]})
    lines = notes(spec, ours, [])
    assert any("branch 10" in n and "1 is within the interval" in n for n in lines)
    assert any("branch 11" in n and "The MACs predict 1.016" in n for n in lines)


@pytest.mark.integration
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_table_runs_and_renders(name, tiny_sd, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep(name, [*standin(name, tiny_sd), f"run.store_dir={tmp_path}/store", "run.progress=false"], sweep_dir)
    spec = compose_cfg(f"experiment={name}").table
    assert spec is not None and spec.name == name, "an experiment file must describe its table"
    spec = _plain_spec(spec)
    for suffix in ("csv", "md", "tex"):
        assert (sweep_dir / f"{name}.{suffix}").is_file(), suffix
    table = pd.read_csv(sweep_dir / f"{name}.csv", dtype=str, keep_default_na=False)
    expected = paper_only(spec)
    # the paper's rows and columns, in the paper's layout (ours may add rows below)
    assert set(expected.columns) <= set(table.columns), f"{name}: {sorted(set(expected.columns) - set(table.columns))}"
    keys = [c for c in expected.columns if c.rpartition("/")[2] not in value_columns(spec)
            and not c.endswith(("_paper", "_delta", "_pm"))]
    assert table[keys].head(len(expected)).values.tolist() == expected[keys].fillna("").values.tolist(), name
    # ours filled in
    ours_cols = [c for c in table.columns if c.rpartition("/")[2] in value_columns(spec)]
    assert (table[ours_cols] != "").any(axis=1).sum() >= len(expected) // 2, f"{name}: empty rows"
    # the paper's numbers as printed
    md = (sweep_dir / f"{name}.md").read_text()
    for t in paper_texts(spec):
        assert f"({t})" in md or f"({t};" in md, f"{name}: {t}"
    # no difference on an incomparable column: the stand-ins' quality protocols and CPU timing
    # are not the paper's (MACs compare everywhere)
    for c in table.columns:
        name_ = c.rpartition("/")[2]
        if name_.endswith("_delta") and not name_.startswith("macs"):
            assert (table[c] == "").all(), f"{name}: {c} has a difference"
    assert "Comparable" in md or not any(v.startswith("macs") for v in value_columns(spec))


def test_ours_in_the_papers_units_and_old_records_too():
    """Precision and recall: ours (fractions) converted to the paper's percent; a record written
    with the former ``paper_scale`` (the paper's converted to fractions) renders the same."""
    from bench.report.paper import our_rows

    table = pd.DataFrame({"interval": [2], "precision": [0.8275], "status": ["ok"]})
    for spec in ({"ours_scale": {"precision": 100}}, _plain_spec({"paper_scale": {"precision": 0.01}})):
        spec = {**spec, "name": "t", "index": ["interval"], "values": {"precision": "Precision"}}
        assert our_rows(table, spec)["precision"].iloc[0] == pytest.approx(82.75)
        assert "Precision in percent, the paper's unit" in " ".join(notes(spec, our_rows(table, spec), []))


def test_other_models_speed_is_against_the_reference_row():
    """BK-SDM rows (main Table 3): speed = their throughput over SD v1.5's PLMS-50 row's of the
    same prompt set (their own record times them against themselves)."""
    from bench.report.paper import our_rows

    spec = {"name": "t", "index": ["prompts", "model"], "values": {"speedup": "Speed"},
            "speedup_against": {"model": "sd15", "schedule": "none", "steps": 50}, "speedup_within": ["prompts"]}
    table = pd.DataFrame({"prompts": ["a", "b", "a", "b"], "model": ["sd15", "sd15", "bk", "bk"],
                          "schedule": ["none"] * 4, "steps": [50] * 4, "throughput": [0.2, 0.4, 0.3, 0.5],
                          "speedup": [1.0, 1.0, 1.0, 1.0], "speedup_pm": [0.01] * 4, "status": ["ok"] * 4})
    ours = our_rows(table, spec)
    assert list(ours["speedup"]) == pytest.approx([1.0, 1.0, 1.5, 1.25])
    assert ours["speedup_pm"].isna().tolist() == [False, False, True, True]
    assert any("separate jobs" in n for n in notes(spec, ours, []))


def test_the_notes_name_the_nonuniform_settings_and_models_that_shared_weights():
    spec = {"name": "t", "index": ["schedule", "interval"], "values": {"fid": "FID"}}
    ours = pd.DataFrame({"schedule": ["nonuniform"] * 2, "interval": [10, 20], "center": [70.0, 70.0],
                         "power": [1.2, 1.2], "fid": [8.2, 9.6], "model": ["digits"] * 2})
    rec = {"status": "ok", "weights_fingerprint": "w",
           "settings": {"model": {"name": "sd15", "nonuniform_default": {"center": 70, "power": 1.2}}}}
    bk = {**rec, "settings": {"model": {"name": "bk_sdm_base"}}}
    lines = notes(spec, ours, [("0", rec), ("1", bk)])
    assert "Our non-uniform rows ran with c = 70, p = 1.2 at every N (the model's default" in " ".join(lines)
    assert any(n.startswith("Warning: bk_sdm_base, sd15 ran with the same weights") for n in lines)
    ours.loc[1, "center"] = 120.0
    assert "N = 10: c = 70, p = 1.2; N = 20: c = 120, p = 1.2" in " ".join(notes(spec, ours, []))
