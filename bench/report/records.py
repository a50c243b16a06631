"""Run records: one ``run.json`` per run, carrying everything that produced it."""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from metrics.files import atomic_write_bytes

RECORD_NAME = "run.json"
RECORD_VERSION = 2
# the distributions whose versions a record carries (environment()["packages"]): what
# generates (torch, diffusers), scores (torch-fidelity, open_clip, transformers, torchmetrics,
# lpips) and composes (hydra-core) a run, and numpy, which every statistic goes through
PACKAGES = ("torch", "diffusers", "torch-fidelity", "open_clip_torch", "transformers", "torchmetrics", "lpips",
            "hydra-core", "numpy")


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (:func:`metrics.files.atomic_write`), a NaN as null: JSON
    (RFC 8259) has no NaN, and strict readers refuse Python's bare ``NaN``. An infinity stays
    ``Infinity`` (Python's and pandas' readers take it): the search records an infeasible
    trial's objective as +inf (:mod:`bench.run.search`)."""
    text = json.dumps(_without_nan(obj), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def _without_nan(o: Any) -> Any:
    """``o`` with enums as their values, arrays as lists and NaN as None."""
    if isinstance(o, dict):
        return {k: _without_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_without_nan(v) for v in o]
    if isinstance(o, float):
        return None if math.isnan(o) else o
    if o is None or isinstance(o, (str, int)):  # bool is an int
        return o
    return _without_nan(_jsonable(o))


def _jsonable(o: Any) -> Any:
    if hasattr(o, "value"):  # enums
        return o.value
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def environment(device: str) -> dict[str, Any]:
    """Versions, git commit and hardware that produced a result; ``packages`` maps each of
    :data:`PACKAGES` to its installed version (None when it is not installed)."""
    import diffusers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "packages": package_versions(),
        "harness_commit": git_commit(),
        "device": device,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
    }
    return env


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``importlib.metadata``), None when absent."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_record(out_dir: str | Path, record: dict[str, Any]) -> Path:
    record = {"record_version": RECORD_VERSION, **record}
    return write_json_atomic(Path(out_dir) / RECORD_NAME, record)
