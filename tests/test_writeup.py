"""One command turns finished sweeps into one document: ``python -m bench.report <sweep_dir> ...
--out <dir>`` writes report.md and report.tex (tables, figures, rerun commands, provenance, what
to trust) from the records alone; the printed command reruns a sweep into the same rows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.report import document, provenance, records
from bench.report.__main__ import main as report_main
from bench.report.jobs import PlannedJob, write_jobs
from bench.report.records import PACKAGES
from metrics.evaluate import quality_metrics
from metrics.features import FeatureExtractor
from metrics.hashing import array_digest, file_digest
from metrics.reference import from_array, load_reference

from harness import ROOT, run_py

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PACKAGE_VERSIONS = {"torch": "2.1.0", "diffusers": "0.30.0", "torch-fidelity": "0.3.0", "open_clip_torch": None,
                    "transformers": "4.40.0", "hydra-core": "1.3.2", "numpy": "1.26.4"}


# ------------------------------------------------------------------------------ synthetic sweeps


def _record(interval: int = 2, *, status: str = "ok", commit: str = COMMIT, version: int = 2, device: str = "cpu",
            wall: float = 10.0, reliable: bool | None = True, error: str | None = None, table: dict | None = None,
            quality: bool = True, time_utc: str = "2026-11-20T10:00:00+00:00", argv: list[str] | None = None,
            world_size: int | None = None) -> dict:
    """A run.json as the runner writes it, with only what the report reads."""
    cache = {"interval": interval, "branch": 1, "schedule": "uniform", "center": None, "power": None}
    settings = {
        "model": {"name": "digits", "weights": "pretrained"},
        "sampler": {"name": "ddim", "steps": 10},
        "cache": cache,
        "run": {"seed": 7, "num_samples": 16, "dtype": "float32", "mode": "full"},
        "quality": {"_target_": "metrics.evaluate.FeatureQuality", "reference": None,
                    "default_reference": {"_target_": "bench.models.digits.load_digits_images", "split": "test"}},
        "table": table,
    }
    env = {"python": "3.11.7", "harness_commit": commit, "device": device, "device_name": "box", "threads": 2,
           "time_utc": time_utc, "argv": argv if argv is not None else ["-m", f"cache.interval={interval}"],
           "packages": dict(PACKAGE_VERSIONS), "torch": "2.1.0+cpu", "diffusers": "0.30.0"}
    rec = {"record_version": version, "status": status, "mode": "full", "settings": settings,
           "wall_time_s": wall, "environment": env}
    if status != "ok":
        return {**rec, "error": error or "boom"}
    m = {"macs_g": 0.05 / interval, "speedup": 1.5 + interval / 10, "speedup_pm": 0.02, "throughput": 3.0}
    if reliable is not None:
        m["timing_reliable"] = reliable
    if quality:
        m.update(protocol="adm/digits-cnn", fid=60.0 + interval, reference_sha256="ab" * 32)
    rec.update(cache={**cache, "skip_producer": "a", "skip_consumer": "b"}, num_samples=16, measurements=m,
               model_source="embedded", weights_fingerprint="feedbeef", timing={"threads": 1})
    if world_size:
        rec["distributed"] = {"world_size": world_size}
    return rec


def _sweep(root: Path, recs: dict[str, dict | None], *, task: list[str] | None = None,
           hydra: list[str] | None = None, jobs: list[PlannedJob] | None = None) -> Path:
    """A sweep folder: ``<job>/run.json`` for each record (None: the job left none), jobs.json and
    (when ``task`` is given) multirun.yaml."""
    root.mkdir(parents=True)
    for job, rec in recs.items():
        (root / job).mkdir()
        if rec is not None:
            (root / job / records.RECORD_NAME).write_text(json.dumps(rec))
    planned = jobs if jobs is not None else [PlannedJob(j, [f"cache.interval={i + 2}"], None, i)
                                             for i, j in enumerate(recs)]
    write_jobs(root, planned)
    if task is not None:
        sweep_dir = str(root)
        cfg = {"hydra": {"sweep": {"dir": sweep_dir}, "overrides": {
            "hydra": hydra if hydra is not None else [f"hydra.sweep.dir={sweep_dir}", "hydra.mode=MULTIRUN"],
            "task": task}}}
        (root / "multirun.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _table13_spec() -> dict:
    return yaml.safe_load((ROOT / "conf" / "experiment" / "table13.yaml").read_text())["table"]


def _report(dirs: list[Path], out: Path, capsys) -> tuple[int, str, str, str, str]:
    rc = report_main([*map(str, dirs), "--out", str(out)])
    captured = capsys.readouterr()
    md = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    tex = (out / "report.tex").read_text() if (out / "report.tex").exists() else ""
    return rc, md, tex, captured.out, captured.err


def _section(md: str, heading: str) -> str:
    """The text of a markdown section, from its heading to the next of the same level."""
    level = heading.split(" ")[0]
    start = md.index(heading)
    nxt = md.find("\n" + level + " ", start + len(heading))
    return md[start:] if nxt < 0 else md[start:nxt]


def _commands(section: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


# --------------------------------------------------------------------------- what records carry


def test_environment_records_the_package_versions(monkeypatch):
    real = metadata.version

    def version(name):
        if name == "open_clip_torch":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(records.metadata, "version", version)
    got = records.package_versions()  # what environment() records as "packages" (a real record: below)
    assert list(got) == list(PACKAGES)
    assert got["open_clip_torch"] is None  # absent: null, not an error
    for name in ("torch", "diffusers", "torch-fidelity", "transformers", "hydra-core", "numpy"):
        assert got[name] == real(name)


class _Blocks(FeatureExtractor):
    name = "toy"

    def extract(self, images, batch_size=64, progress=False):
        grey = images.astype(np.float64).mean(axis=(-1))
        pool = grey.reshape(len(grey), -1)[:, :6]
        return {"pool": pool, "logits": pool[:, :4]}


def test_quality_records_the_reference_content_hash(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, size=(40, 4, 4, 3), dtype=np.uint8)
    fake = rng.integers(0, 255, size=(20, 4, 4, 3), dtype=np.uint8)
    out = quality_metrics(fake, ref, _Blocks(), metrics=("fid",))
    assert out["reference_sha256"] == array_digest(ref)
    other = quality_metrics(fake, ref[::-1].copy(), _Blocks(), metrics=("fid",))
    assert other["reference_sha256"] != out["reference_sha256"]
    # a statistics-only .npz (no images) is hashed by its file's bytes
    np.savez(tmp_path / "stats.npz", mu=np.zeros(6), sigma=np.eye(6))
    stats = load_reference(tmp_path / "stats.npz", stats_extractor="toy")
    assert quality_metrics(fake, stats, _Blocks(), metrics=("fid",))["reference_sha256"] == \
        file_digest(tmp_path / "stats.npz")
    assert from_array(ref).content_hash() == array_digest(ref)


# ---------------------------------------------------------------------------------- commands


def test_the_command_is_hydras_record_of_the_sweep_with_the_config_flags(tmp_path):
    task = ["model=digits", "cache.interval=2,5", "run.prompts.source=my prompts.txt", "cache.branch=range(1,3)"]
    hydra = [f"hydra.sweep.dir={tmp_path}/s", "hydra.mode=MULTIRUN", "hydra/launcher=submitit_local"]
    argv = ["-cn", "config", "-m", *task, f"hydra.sweep.dir={tmp_path}/s", "hydra/launcher=submitit_local"]
    d = _sweep(tmp_path / "s", {"0": _record(argv=argv), "1": _record(5, argv=argv)}, task=task, hydra=hydra)
    cmd = provenance.sweep_command(d, [("0", _record(argv=argv))], [])
    assert cmd.lines == [
        "python run.py -cn config -m model=digits cache.interval=2,5 'run.prompts.source=my prompts.txt' "
        f"'cache.branch=range(1,3)' hydra/launcher=submitit_local hydra.sweep.dir={tmp_path}/s-rerun"]
    assert cmd.source == "multirun.yaml" and cmd.rerun_dir == f"{tmp_path}/s-rerun" and not cmd.notes
    # a launcher's process (not the sweep's command line): multirun.yaml, and a note
    cmd = provenance.sweep_command(d, [("0", _record(argv=["/tmp/submitit/x"]))], [])
    assert cmd.lines[0].startswith("python run.py -m model=digits") and "launcher" in cmd.notes[0]


def test_without_multirun_yaml_the_command_comes_from_argv_or_the_jobs(tmp_path):
    argv = ["-m", "cache.interval=2,3", "hydra.sweep.dir=/old"]
    d = _sweep(tmp_path / "a", {"0": _record(argv=argv)})
    cmd = provenance.sweep_command(d, [("0", _record(argv=argv))], [])
    assert cmd.lines == [f"python run.py -m cache.interval=2,3 hydra.sweep.dir={d}-rerun"]
    # no command line: the jobs' overrides, as a grid when they form one ...
    grid = [PlannedJob(str(i), [f"cache.interval={n}", f"sampler.steps={s}"], None, i)
            for i, (n, s) in enumerate([(2, 10), (2, 20), (5, 10), (5, 20)])]
    cmd = provenance.sweep_command(d, [("0", _record(argv=[]))], grid)
    assert cmd.lines == [f"python run.py -m cache.interval=2,5 sampler.steps=10,20 hydra.sweep.dir={d}-rerun"]
    # ... else one run per job, then the table
    cmd = provenance.sweep_command(d, [("0", _record(argv=[]))], grid[:3])
    assert cmd.lines == [f"python run.py cache.interval=2 sampler.steps=10 hydra.run.dir={d}-rerun/0",
                         f"python run.py cache.interval=2 sampler.steps=20 hydra.run.dir={d}-rerun/1",
                         f"python run.py cache.interval=5 sampler.steps=10 hydra.run.dir={d}-rerun/2",
                         f"python -m bench.report {d}-rerun"]


# -------------------------------------------------------------------------------- the document


def test_the_document_says_what_not_to_trust(tmp_path, capsys):
    """Unreliable timing, failed and missing jobs, records of another commit and record version:
    each named in report.md and report.tex, the mix also on stderr; exit 1 (a job is missing)."""
    error = r"quality: 5 images < split_size=8 & 50% of {x} cost $3 #1 ~ ^ \path"
    d = _sweep(tmp_path / "a", {
        "0": _record(2, reliable=False),
        "1": _record(3, status="failed", error=error),
        "2": None,  # killed: no run.json
        "3": _record(5, commit="fedcba9876543210fedcba9876543210fedcba98-dirty", version=1),
    }, task=["cache.interval=2,3,4,5"])
    rc, md, tex, out, err = _report([d], tmp_path / "out", capsys)
    assert rc == 1
    assert "warning: records from 2 commits" in err and "warning: records of 2 harness record versions" in err
    assert "1 of 4 jobs left no run.json (job 2)" in err
    trust = _section(md, "## What to trust")
    assert "**Warning: records from 2 commits" in trust and "record_version 1 (1 records)" in trust
    assert re.search(r"Timing flagged unreliable:\*\*\n\n- S1 table: job 0, uniform N=2 branch 1, 10 steps: "
                     r"speed-up 1\.7 ±2\.0 %", trust)
    assert f"- S1 table: job 1, uniform N=3 branch 1, 10 steps: {error.replace('|', '')}" in trust
    assert "- S1 table: job 2 left no run.json" in trust
    assert "uncommitted changes (fedcba9876543210fedcba9876543210fedcba98-dirty)" in trust
    assert "**Not comparable with the paper:** none." in trust  # no paper table
    # LaTeX: the error's special characters escaped, the warning in bold
    assert (r"quality: 5 images < split\_size=8 \& 50\% of \{x\} cost \$3 \#1 \textasciitilde{} "
            r"\textasciicircum{} \textbackslash{}path") in tex
    assert r"\item \textbf{WARNING}: records from 2 commits" in tex
    # the plain table says which rows failed or are missing, and flags the unreliable speed-up
    table = _section(md, "## S1")
    assert "| status" in table and "missing" in table and "failed" in table
    assert "1.7 ±2.0 % (unreliable)" in table


def test_a_paper_table_brings_its_notes_figure_and_comparability(tmp_path, capsys):
    spec = _table13_spec()
    recs = {str(i): _record(i + 2, table=spec, quality=False) for i in range(2)}
    for i, r in enumerate(recs.values()):
        r["settings"]["cache"]["branch"] = r["cache"]["branch"] = i + 1
        r["settings"]["model"]["name"] = "ddpm_cifar10"
        r["settings"]["sampler"]["steps"] = 100
        r["cache"]["interval"] = r["settings"]["cache"]["interval"] = 5
    d = _sweep(tmp_path / "t13", recs, task=["experiment=table13", "cache.branch=1,2"])
    rc, md, tex, out, err = _report([d], tmp_path / "out", capsys)
    assert rc == 0 and not err
    trust = _section(md, "## What to trust")
    assert "- S1 table13: Throughput (img/s), Speed, FID" in trust  # MACs is the comparable column
    inconsistencies = trust[trust.index("**The paper's inconsistencies"):]
    assert "- S1 table13: Branches 7 and 8 are about 2 % above the paper" in inconsistencies
    s1 = _section(md, "## S1: Supp. Table 13")
    assert "| Skip branch" in s1 and "Cells: ours (the paper's" in s1  # the rendered paper layout
    assert "![Supp. Table 13" in s1 and (tmp_path / "out" / "s1-table13.png").is_file()
    assert r"\includegraphics[width=\linewidth]{s1-table13.png}" in tex
    assert _commands(s1) == [f"python run.py -m experiment=table13 cache.branch=1,2 hydra.sweep.dir={d}-rerun"]
    # the table's unicode (— in empty cells) is declared for pdflatex
    assert r"\DeclareUnicodeCharacter{2014}{---}" in tex


def test_provenance_and_compute(tmp_path, capsys):
    gpu = _sweep(tmp_path / "gpu", {"0": _record(device="cuda:0", wall=1800.0, world_size=2),
                                     "1": _record(5, device="cuda:0", wall=1800.0, world_size=2,
                                                  time_utc="2026-11-21T08:00:00+00:00")},
                 task=["cache.interval=2,5", "run.device=cuda"])
    cpu = _sweep(tmp_path / "cpu", {"0": _record(wall=36.0)}, task=["cache.interval=2"])
    rc, md, tex, out, err = _report([gpu, cpu], tmp_path / "out", capsys)
    assert rc == 0
    s1, s2 = _section(md, "## S1"), _section(md, "## S2")
    assert "| compute | 60.0 min wall, 2 GPU-hours |" in s1  # 2 x 1800 s x 2 processes
    assert "| compute | 36.0 s wall, 0.01 CPU-hours |" in s2
    assert "| samples | 16 per row |" in s1 and "| seeds | 7 |" in s1 and "| protocol | adm/digits-cnn |" in s1
    assert ("| reference statistics | the model's default, bench.models.digits.load_digits_images(split=test); "
            f"sha256 {'ab' * 32} |") in s1
    prov = _section(md, "## Provenance")
    assert f"| git commit | {COMMIT} |" in prov
    for name, v in {**PACKAGE_VERSIONS, "torch": "2.1.0+cpu"}.items():  # torch as torch.__version__ says
        assert f"| {name} | {v or 'not installed'} |" in prov
    assert "| device | S1: cuda:0 (box); S2: cpu (box) |" in prov
    assert "| processes per run | S1: 2; S2: 1 |" in prov
    assert "| dtype | float32 |" in prov and "| threads | 2 |" in prov
    assert "S1: 2026-11-20T10:00:00+00:00 to 2026-11-21T08:00:00+00:00" in prov
    assert "(total 2 GPU-hours, 0.01 CPU-hours)" in prov


@pytest.mark.parametrize("argv, expect", [
    (["{missing}", "--out", "{out}"], "no such directory"),
    (["{empty}", "--out", "{out}"], "not a sweep directory"),
    (["{a}", "{b}"], "give --out <dir>"),
    (["{a}", "{a}/", "--out", "{out}"], "given twice"),
    (["{a}", "--out", "{file}"], "is a file, not a directory"),
    (["{a}", "--outdir", "{out}"], "unknown option --outdir"),
    (["{a}", "--out"], "--out needs a directory"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, expect):
    a = _sweep(tmp_path / "a", {"0": _record()}, task=["cache.interval=2"])
    b = _sweep(tmp_path / "b", {"0": _record()}, task=["cache.interval=2"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    paths = dict(missing=tmp_path / "nope", empty=tmp_path / "empty", out=tmp_path / "out", a=a, b=b,
                 file=tmp_path / "file")
    rc = report_main([w.format(**paths) for w in argv])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (a / "table.csv").exists() and not (b / "table.csv").exists()


def test_one_directory_without_out_is_the_table_command_as_before(tmp_path, capsys):
    d = _sweep(tmp_path / "a", {"0": _record(), "1": None}, task=["cache.interval=2,3"])
    assert report_main([str(d)]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == str(d / "table.csv")
    assert "1 of 2 jobs left no run.json (job 1)" in captured.err
    assert sorted(p.name for p in d.iterdir()) == ["0", "1", "jobs.json", "multirun.yaml", "table.csv"]
    assert report_main([]) == 2 and "no sweep directory" in capsys.readouterr().err


def test_latex_escaping_and_unicode():
    assert document.latex_escape(r"a_b & 5% $x$ #1 {y} ~ ^ \z") == \
        r"a\_b \& 5\% \$x\$ \#1 \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{}z"
    # a command stays copyable: no -- ligature, breaks only after / , =
    assert document.latex_code("run.py --out a_b/c") == r"run.py -{}-{}out a\_b/\allowbreak{}c"
    decl = document.unicode_declarations("±3 − Δ é 漢")
    assert r"\DeclareUnicodeCharacter{00B1}{\ensuremath{\pm}}" in decl
    assert r"\DeclareUnicodeCharacter{2212}{\ensuremath{-}}" in decl
    assert r"\DeclareUnicodeCharacter{6F22}{?}" in decl  # unknown: a placeholder, never a pdflatex error
    assert "00E9" not in decl  # é: a T1 glyph


def _pdflatex(tex: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", tex.name], cwd=tex.parent,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_the_tex_of_awkward_records_compiles(tmp_path, capsys):
    error = r"bad {value} 100% & $HOME_dir #2 ~user ^c \n ± − Δ ≈ 漢"
    spec = _table13_spec()
    d = _sweep(tmp_path / "a_b&c", {"0": _record(reliable=False), "1": _record(3, status="failed", error=error),
                                    "2": None, "3": _record(5, commit="x-dirty", version=1)},
               task=["cache.interval=2,3,4,5", "run.prompts.source=a b%c"])
    t = _sweep(tmp_path / "t13", {"0": _record(table=spec, quality=False)}, task=["experiment=table13"])
    out = tmp_path / "out dir"
    rc, md, tex, _, _ = _report([d, t], out, capsys)
    assert rc == 1
    r = _pdflatex(out / "report.tex")
    assert r.returncode == 0, r.stdout[-3000:]
    assert (out / "report.pdf").stat().st_size > 10_000


# ------------------------------------------------------------------- two real sweeps, end to end

COST = ["-m", "run.mode=cost", "model.weights=random", "model=ddpm_cifar10", "sampler.steps=10",
        "cache.interval=2,5", "run.timing_repeats=3", "run.progress=false"]
DIGITS = ["-m", "cache.interval=2,5", "run.num_samples=16", "quality.is_split_size=8", "sampler.steps=10",
          "run.timing=off", "run.progress=false"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """A cost sweep of the CIFAR-10 DDPM (random weights) and a full digits sweep, each two intervals."""
    root = tmp_path_factory.mktemp("writeup")
    out = {}
    for name, args in (("cost", COST), ("digits", DIGITS)):
        r = run_py(*args, f"run.store_dir={root}/store-{name}", f"hydra.sweep.dir={root}/{name}")
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = root / name
    return root, out


@pytest.mark.integration
def test_report_of_two_real_sweeps(sweeps, tmp_path, capsys):
    root, s = sweeps
    rc, md, tex, out, err = _report([s["cost"], s["digits"]], tmp_path / "out", capsys)
    assert rc == 0 and "warning" not in err
    rec = json.loads((s["digits"] / "0" / "run.json").read_text())
    # the tables: every row of table.csv, its MACs and quality as the document shows them
    for name, sec in (("cost", _section(md, "## S1")), ("digits", _section(md, "## S2"))):
        df = pd.read_csv(s[name] / "table.csv")
        assert len(df) == 3
        for _, row in df.iterrows():
            cells = [document.fmt(row["macs_g"])] + ([document.fmt(row[c]) for c in ("fid", "is_mean", "recall")]
                                                    if name == "digits" else [])
            assert any(all(c in line for c in cells) for line in sec.splitlines() if line.startswith("|")), cells
    s1, s2 = _section(md, "## S1"), _section(md, "## S2")
    assert "| samples | no images (run.mode=cost: MACs and timing only) |" in s1
    assert "| samples | 16 per row |" in s2 and "| seeds | 0 |" in s2 and "| protocol | adm/digits-cnn |" in s2
    from bench.models.digits import load_digits_images

    digest = array_digest(load_digits_images("test"))  # the 300 held-out digits the protocol scores against
    assert rec["measurements"]["reference_sha256"] == digest
    assert f"load_digits_images(split=test); sha256 {digest} |" in s2
    assert re.search(r"\| compute \| [\d.]+ s wall, [\d.e-]+ CPU-hours \|", s2)
    # the commands: the sweeps' own command lines, into fresh folders
    assert _commands(s1) == ["python run.py " + " ".join(COST) + f" run.store_dir={root}/store-cost "
                             f"hydra.sweep.dir={s['cost']}-rerun"]
    assert _commands(s2) == ["python run.py " + " ".join(DIGITS) + f" run.store_dir={root}/store-digits "
                             f"hydra.sweep.dir={s['digits']}-rerun"]
    # provenance, from the records
    prov = _section(md, "## Provenance")
    env = rec["environment"]
    assert env["packages"] == {name: metadata.version(name) for name in PACKAGES}
    assert f"| git commit | {env['harness_commit'].removesuffix('-dirty')}" in prov
    import torch

    for name in PACKAGES:
        v = torch.__version__ if name == "torch" else metadata.version(name)
        assert f"| {name} | {v} |" in prov
    assert "| device | cpu (" in prov and "| dtype | float32 |" in prov
    assert f"| threads | {env['threads']} |" in prov and "| threads while timing | S1: 1; S2: no timing |" in prov


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_report_of_two_real_sweeps_compiles(sweeps, tmp_path, capsys):
    _, s = sweeps
    rc, *_ = _report([s["cost"], s["digits"]], tmp_path / "out", capsys)
    assert rc == 0
    r = _pdflatex(tmp_path / "out" / "report.tex")
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.integration
def test_the_printed_command_reproduces_the_rows(sweeps, tmp_path, capsys):
    """The digits sweep (16 images per row: the one whose rows hold quality) rerun with the
    command as the report prints it, its images generated again (store emptied): the same
    settings, MACs and quality in every row."""
    root, s = sweeps
    rc, md, *_ = _report([s["cost"], s["digits"]], tmp_path / "out", capsys)
    [command] = _commands(_section(md, "## S2"))
    shutil.rmtree(root / "store-digits")
    r = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    before = pd.read_csv(s["digits"] / "table.csv", dtype=str, keep_default_na=False)
    after = pd.read_csv(Path(f"{s['digits']}-rerun") / "table.csv", dtype=str, keep_default_na=False)
    assert (root / "store-digits").is_dir()  # generated again, not reused
    same = [c for c in before.columns if c.startswith("macs") or c in (
        "model", "weights", "sampler", "steps", "model_calls", "schedule", "interval", "branch", "seed",
        "num_samples", "protocol", "n_fake", "fid", "is_mean", "is_std", "precision", "recall",
        "reference_sha256", "status", "job")]
    assert len(same) >= 20
    pd.testing.assert_frame_equal(before[same], after[same])
