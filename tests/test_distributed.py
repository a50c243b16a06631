"""One run over several processes (torchrun, gloo on the CPU): the images of one process,
one record, one output directory; a rank that fails fails the run and rank 0 records it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.run import distributed
from bench.core.errors import HarnessError
from bench.run.runner import run
from bench.sampling.store import ImageStore
from harness import ROOT, compose_cfg

# one thread per process: two ranks on two cores (torchrun sets OMP_NUM_THREADS=1 too)
SMALL = ["sampler.steps=10", "run.num_samples=8", "run.batch_size=3", "quality.is_split_size=4",
         "run.timing=off", "run.progress=false", "run.threads=1"]


def torchrun(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.integration
def test_torchrun_two_processes_give_the_images_of_one_and_one_record(tmp_path):
    """`torchrun --nproc-per-node 2 run.py ...` without hydra.run.dir: both ranks use one
    output directory, each generates half of the samples, rank 0 alone writes run.json;
    the stored images are bit-identical to a single process's and so are the metrics."""
    common = [*SMALL, f"metrics.cache_dir={tmp_path}/metrics"]
    r = torchrun(str(ROOT / "run.py"), *common, f"run.store_dir={tmp_path}/s2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    records = list((tmp_path / "outputs").glob("*/*/run.json"))
    assert len(records) == 1, records
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert run_dirs == [records[0].parent]  # one directory for both ranks
    assert r.stdout.count("run record:") == 1
    # only rank 0 wrote Hydra's files there: rank 1's command line carries output_subdir=null
    hydra_yaml = (records[0].parent / ".hydra" / "hydra.yaml").read_text()
    assert "hydra.output_subdir=null" not in hydra_yaml

    rec = json.loads(records[0].read_text())
    assert rec["status"] == "ok"
    assert rec["distributed"] == {"world_size": 2, "backend": "gloo", "sample_indices_by_rank": [[0, 4], [4, 8]]}
    assert rec["num_samples"] == 8 and rec["generation"]["generated"] == 8
    assert [x["generated"] for x in rec["baseline"]["generation"]["by_rank"]] == [4, 4]

    threads = torch.get_num_threads()
    try:
        one = json.loads(run(compose_cfg(*common, f"run.store_dir={tmp_path}/s1"), tmp_path / "one").read_text())
    finally:
        torch.set_num_threads(threads)
    assert "distributed" not in one
    for a, b in ((one["store"], rec["store"]), (one["baseline"]["store"], rec["baseline"]["store"])):
        assert Path(a).name == Path(b).name  # same settings, same store key
        assert np.array_equal(ImageStore.existing(a).load(range(8)), ImageStore.existing(b).load(range(8)))
    for key in ("fid", "is_mean", "precision", "recall"):
        assert rec["measurements"][key] == pytest.approx(one["measurements"][key], rel=1e-9)
        assert rec["baseline"]["measurements"][key] == pytest.approx(one["baseline"]["measurements"][key], rel=1e-9)


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from harness import compose_cfg
    from bench.run.runner import run
    rank = int(os.environ["RANK"])
    store = {store!r} if rank == 0 else {bad_store!r}  # rank 1 alone cannot write its images
    cfg = compose_cfg(*{small!r}, "run.store_dir=" + store, "metrics.cache_dir={tmp}/metrics")
    try:
        run(cfg, {tmp!r} + "/out" + str(rank))
        outcome = "ok"
    except Exception as e:
        outcome = str(e)
    with open({tmp!r} + "/outcome" + str(rank), "w") as f:
        f.write(outcome)
""")


@pytest.mark.integration
def test_a_rank_that_fails_fails_every_rank_and_rank_0_records_it(tmp_path):
    """Rank 1 fails before the sync (its store is not writable); rank 0, which generated its
    half, does not wait for it: it fails naming rank 1's error and writes the failure record.
    Rank 1 writes no record."""
    (tmp_path / "a_file").write_text("not a directory")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(
        root=str(ROOT), tests=str(ROOT / "tests"), small=SMALL, tmp=str(tmp_path),
        store=str(tmp_path / "store"), bad_store=str(tmp_path / "a_file" / "store"),
    ))
    r = torchrun(str(script), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    own = (tmp_path / "outcome1").read_text()
    assert own.startswith("run.store_dir=") and "is not writable" in own
    assert (tmp_path / "outcome0").read_text() == f"rank 1 of 2: {own}"
    rec = json.loads((tmp_path / "out0" / "run.json").read_text())
    assert rec["status"] == "failed" and rec["error"] == f"rank 1 of 2: {own}"
    assert not (tmp_path / "out1").exists()


def test_an_indexed_gpu_is_refused_when_several_processes_run(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(HarnessError, match=r"run.device='cuda:1' names one GPU, but 2 processes were started"):
        distributed.setup("cuda:1")


def test_one_process_is_rank_0_of_1(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.launched() and distributed.is_main_process()
    ctx = distributed.current()
    assert (ctx.rank, ctx.world_size, ctx.distributed) == (0, 1, False)
    assert ctx.part(range(3, 9)) == range(3, 9)
    assert distributed.prepare_launch([]) == []


def test_parts_of_a_run_cover_it_in_order():
    parts = [distributed.Context(rank=r, world_size=3).part(range(10, 20)) for r in range(3)]
    assert [list(p) for p in parts] == [list(range(10, 13)), list(range(13, 17)), list(range(17, 20))]
    with pytest.raises(HarnessError, match="2 samples cannot be split over 3 processes"):
        distributed.Context(rank=0, world_size=3).part(range(2))
