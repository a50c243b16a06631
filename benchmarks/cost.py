"""Benchmarks behind the performance numbers of docs/timing.md and docs/metrics.md (not timed tests).

    python -m benchmarks.cost speedup     # measured vs MACs-predicted speed-up, CIFAR-10
    python -m benchmarks.cost overhead    # the engine's own cost on a retrieval call
    python -m benchmarks.cost methods     # loop timing vs timing composed from calls
    python -m benchmarks.cost default     # `python run.py` wall time, generation speed-up
    python -m benchmarks.cost table13     # the Table 13 cost sweep's wall time
    python -m benchmarks.cost load        # the user's sweep alone and beside CPU hogs: speed-ups agree
    python -m benchmarks.cost gpu         # on a CUDA device: throughput of the paper's models

Each prints a markdown table and writes ``results/benchmarks/<name>.json`` with the
machine, thread count, date and every raw number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.cost import measure
from bench.models import loading as models
from bench.run.parts import model_spec, resolve
from bench.caching.engine import CacheSettings, DeepCache, deepcache
from bench.report.records import environment, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "benchmarks"


def _cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from bench.cli import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def speedup(repeats: int = 5) -> dict[str, Any]:
    """CIFAR-10 (random weights), DDIM-100, branch 3: measured vs predicted, batch 1 and 16."""
    rows = []
    for batch in (1, 16):
        for n in (2, 3, 5, 10):
            cfg = _cfg("model=ddpm_cifar10", "model.weights=random", "sampler.steps=100", f"cache.interval={n}",
                       "cache.branch=3", "run.timing=calls", f"run.timing_batch_size={batch}",
                       f"run.timing_repeats={repeats}", "run.timing_warmup=1")
            p = resolve(cfg)
            loaded, settings = models.load_model(p.model), p.cache
            plan = settings.full_calls(100)
            macs = measure.macs_record(loaded, p.model, settings, plan, 100)
            t, details = measure.timing_record(loaded, p.model, p.sampler, p.timing, settings, plan, 100)
            rows.append({"batch": batch, "N": n, "predicted": macs["macs_predicted_speedup"],
                         "measured": t["speedup"], "pm": t["speedup_pm"],
                         "ratio": t["speedup"] / macs["macs_predicted_speedup"],
                         "throughput": t["throughput"], "throughput_baseline": t["throughput_baseline"],
                         "raw_s": details["raw_s"]})
    return {"rows": rows, "columns": ["batch", "N", "predicted", "measured", "pm", "ratio"]}


def overhead(repeats: int = 300) -> dict[str, Any]:
    """Time of a retrieval call through the engine vs the same computation called directly."""
    cfg = _cfg("model=ddpm_cifar10", "model.weights=random")
    unet = models.load_model(model_spec(cfg.model)).unet
    x, t = torch.randn(1, 3, 32, 32), torch.tensor(500)
    rows = []
    for branch in (1, 3, 12):
        engine = DeepCache(unet, CacheSettings(interval=10**6, branch=branch)).attach()
        try:
            with torch.inference_mode():
                unet(x, t)  # fills the cache
                view, stored = engine._retrieval_unet, engine._stored

                def direct():  # the same truncated forward, without the engine's bookkeeping
                    stored.tensor = engine.state.stored
                    type(unet).forward(view, x, t)
                    stored.tensor = None

                def through_engine():
                    unet(x, t)

                for _ in range(20):
                    direct(), through_engine()
                times = {"direct": [], "engine": []}
                for _ in range(repeats):
                    for name, fn in (("direct", direct), ("engine", through_engine)):
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
        finally:
            engine.detach()
        d, e = statistics.median(times["direct"]), statistics.median(times["engine"])
        rows.append({"branch": branch, "retrieval_direct_ms": d * 1e3, "retrieval_engine_ms": e * 1e3,
                     "overhead_us": (e - d) * 1e6, "overhead_pct": 100 * (e - d) / d})
    return {"rows": rows, "columns": ["branch", "retrieval_direct_ms", "retrieval_engine_ms", "overhead_us",
                                      "overhead_pct"]}


def methods(repeats: int = 5) -> dict[str, Any]:
    """On the embedded model: speed-up from whole loops vs composed from calls, same settings."""
    rows = []
    for batch in (1, 16):
        for method in ("loop", "calls"):
            cfg = _cfg("run.mode=cost", f"run.timing={method}", f"run.timing_batch_size={batch}",
                       f"run.timing_repeats={repeats}", "run.timing_warmup=1", "cache.interval=5")
            p = resolve(cfg)
            loaded, settings = models.load_model(p.model), p.cache
            plan = settings.full_calls(100)
            t, details = measure.timing_record(loaded, p.model, p.sampler, p.timing, settings, plan, 100)
            rows.append({"batch": batch, "method": method, "branch": settings.branch,
                         "throughput": t["throughput"], "throughput_baseline": t["throughput_baseline"],
                         "speedup": t["speedup"], "pm": t["speedup_pm"], "raw_s": details["raw_s"]})
    return {"rows": rows, "columns": ["batch", "method", "branch", "throughput", "throughput_baseline", "speedup",
                                      "pm"]}


def _timed_run(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr)
    return time.perf_counter() - t0, r


def default(runs: int = 3) -> dict[str, Any]:
    """`python run.py` with defaults on a fresh store: wall time, generation speed-up."""
    rows = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            wall, _ = _timed_run([f"run.store_dir={tmp}/store", f"hydra.run.dir={tmp}/out"])
            rec = json.loads((Path(tmp) / "out" / "run.json").read_text())
        g_base = rec["baseline"]["generation"]["generation_time_s"]
        g_cached = rec["generation"]["generation_time_s"]
        m, b = rec["measurements"], rec["baseline"]["measurements"]
        rows.append({"run": i, "wall_s": wall, "generation_baseline_s": g_base, "generation_cached_s": g_cached,
                     "generation_speedup": g_base / g_cached, "timing_speedup": m["speedup"],
                     "timing_pm": m["speedup_pm"], "fid_baseline": b["fid"], "fid_cached": m["fid"],
                     "branch": rec["cache"]["branch"], "interval": rec["cache"]["interval"]})
    return {"rows": rows, "columns": ["run", "wall_s", "generation_baseline_s", "generation_cached_s",
                                      "generation_speedup", "timing_speedup", "timing_pm"]}


def table13(runs: int = 3) -> dict[str, Any]:
    rows = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            wall, _ = _timed_run(["-m", "experiment=table13", f"hydra.sweep.dir={tmp}/sweep"])
        rows.append({"run": i, "wall_s": wall})
    return {"rows": rows, "columns": ["run", "wall_s"]}


HOGS = {
    # one busy-looping Python process per core: the CPU fully taken by other work
    "busy": lambda n: [[sys.executable, "-c", "while True: pass"] for _ in range(n)],
    # another harness-like job: a torch process with as many threads as cores, multiplying matrices
    "torch": lambda n: [[sys.executable, "-c", "import torch\ntorch.set_num_threads(%d)\na = torch.randn(512, 512)\n"
                         "while True: a = (a @ a).tanh()" % n]],
}
LOAD_SWEEP = ["-m", "cache.interval=2,3,5,10,20", "cache.schedule=nonuniform", "run.num_samples=128"]


def load(conditions: tuple[str, ...] = ("alone", "busy", "torch")) -> dict[str, Any]:
    """The user's sweep (``python run.py -m cache.interval=2,3,5,10,20 cache.schedule=nonuniform
    run.num_samples=128``) alone and beside CPU hogs: the speed-up column must agree within
    10 % of the unloaded sweep's. The first condition generates the images; the others find
    them in the same store (a rerun), so what runs beside the hogs is scoring and timing."""
    cores = os.cpu_count() or 1
    rows, speedups = [], {}
    with tempfile.TemporaryDirectory() as store:
        for condition in conditions:
            hogs = [] if condition == "alone" else [subprocess.Popen(cmd) for cmd in HOGS[condition](cores)]
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    wall, _ = _timed_run([*LOAD_SWEEP, f"run.store_dir={store}", f"hydra.sweep.dir={tmp}/sweep"])
                    recs = sorted((json.loads(p.read_text()) for p in Path(tmp, "sweep").glob("*/run.json")),
                                  key=lambda r: r["cache"]["interval"])
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            for rec in recs:
                m, t = rec["measurements"], rec["timing"]
                n = rec["cache"]["interval"]
                speedups[(condition, n)] = m["speedup"]
                rows.append({"condition": condition, "N": n, "speedup": m["speedup"], "pm": m["speedup_pm"],
                             "reliable": m["timing_reliable"], "vs_alone": None, "method": m["timing_method"],
                             "rounds": t["rounds"], "foreign_load": t["foreign_load"], "sweep_wall_s": wall,
                             "predicted": m["macs_predicted_speedup"], "warning": t["warning"]})
    for row in rows:
        alone = speedups.get(("alone", row["N"]))
        row["vs_alone"] = row["speedup"] / alone - 1 if alone else None
    return {"rows": rows, "cores": cores, "sweep": LOAD_SWEEP,
            "columns": ["condition", "N", "speedup", "pm", "reliable", "vs_alone", "foreign_load", "rounds",
                        "predicted"]}


def gpu() -> dict[str, Any]:
    """On a CUDA device: loop throughput, baseline vs cached, interleaved, for the paper's
    architectures (random weights; speed does not depend on the values), and the
    engine's exactness in float16 on the GPU."""
    settings = [
        # model, sampler, steps, N, branch, batch, dtype
        ("ddpm_cifar10", "ddim", 100, 5, 3, 128, "float32"),
        ("ddpm_cifar10", "ddim", 100, 5, 3, 128, "float16"),
        ("sd15", "plms", 50, 5, 2, 1, "float16"),
        ("ldm_cin256", "ddim", 250, 10, 1, 8, "float16"),
    ]
    rows = []
    for model, sampler, steps, n, branch, batch, dtype in settings:
        cfg = _cfg(f"model={model}", "model.weights=random", f"sampler={sampler}", f"sampler.steps={steps}",
                   f"cache.interval={n}", f"cache.branch={branch}", "run.device=cuda", f"run.dtype={dtype}",
                   "run.timing=loop", f"run.timing_batch_size={batch}", "run.timing_repeats=3", "run.timing_warmup=1")
        p = resolve(cfg)
        loaded, s = models.load_model(p.model, "cuda", getattr(torch, dtype)), p.cache
        from bench.sampling import loop as sampling

        calls = sampling.num_model_calls(sampling.build_scheduler(p.sampler, loaded.scheduler_config))
        plan = s.full_calls(calls)
        macs = measure.macs_record(loaded, p.model, s, plan, calls)
        t, details = measure.timing_record(loaded, p.model, p.sampler, p.timing, s, plan, calls)
        rows.append({"model": model, "sampler": f"{sampler}-{steps}", "N": n, "branch": branch, "batch": batch,
                     "dtype": dtype, "throughput_baseline": t["throughput_baseline"], "throughput": t["throughput"],
                     "speedup": t["speedup"], "pm": t["speedup_pm"], "predicted": macs["macs_predicted_speedup"],
                     "raw_s": details["raw_s"]})
        del loaded
        torch.cuda.empty_cache()
    # exactness on the GPU in float16: N = 1 and retrieval on the full call's own input
    cfg = _cfg("model=ddpm_cifar10", "model.weights=random")
    unet = models.load_model(model_spec(cfg.model), "cuda", torch.float16).unet
    x, t = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.float16), torch.tensor(500)
    with torch.inference_mode():
        ref = unet(x, t).sample
        with deepcache(unet, CacheSettings(interval=1, branch=3)):
            same = unet(x, t).sample
        with deepcache(unet, CacheSettings(interval=2, branch=3)):
            full, retr = unet(x, t).sample, unet(x, t).sample
    exact = {"n1_equal": bool(torch.equal(same, ref)), "full_equal": bool(torch.equal(full, ref)),
             "retrieval_max_abs_diff": float((retr - full).abs().max())}
    return {"rows": rows, "exactness_fp16_cuda": exact, "device": torch.cuda.get_device_name(),
            "columns": ["model", "sampler", "N", "branch", "batch", "dtype", "throughput_baseline", "throughput",
                        "speedup", "pm", "predicted"]}


BENCHMARKS = {"gpu": gpu, "speedup": speedup, "overhead": overhead, "methods": methods, "default": default,
              "table13": table13, "load": load}


def _markdown(result: dict[str, Any]) -> str:
    cols = result["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols]  # noqa: E501
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    args = parser.parse_args(argv)
    result = BENCHMARKS[args.name]()
    result["environment"] = environment("cuda" if args.name == "gpu" else "cpu")
    result["median"] = {
        c: statistics.median(r[c] for r in result["rows"])
        for c in result["columns"] if all(isinstance(r[c], float) and not isinstance(r[c], bool) for r in result["rows"])
    }
    write_json_atomic(OUT / f"{args.name}.json", result)
    print(_markdown(result))
    print(f"\nwritten: {OUT / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
