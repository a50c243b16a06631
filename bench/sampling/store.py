"""Generated images on disk, keyed by the settings that change them.

A store directory is ``<store_dir>/<sha256 of the key>/`` holding ``key.json`` and
shards ``samples_<start>_<stop>.npz`` (``arr_0``: uint8 N x H x W x C, the ADM
evaluator's layout; ``indices``: the sample indices). Shards are written atomically
(temp file + rename), so a killed run leaves only complete shards, and a rerun with
the same settings generates exactly the samples that are missing. The key is made of
what changes images (model weights, sampler, steps, cache settings, seed), never of
the output directory, so a sweep's jobs share the uncached baseline.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bench.core.errors import HarnessError
from metrics.files import atomic_write, atomic_write_bytes

STORE_VERSION = 1
_SHARD = re.compile(r"^samples_(\d{7})_(\d{7})\.npz$")


def key_digest(key: dict[str, Any]) -> str:
    blob = json.dumps({"store_version": STORE_VERSION, **key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ImageStore:
    """The images of one setting, in index order."""

    def __init__(self, root: str | Path, key: dict[str, Any]):
        self.key = key
        self.dir = Path(root) / key_digest(key)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            key_file = self.dir / "key.json"
            if not key_file.exists():
                atomic_write_bytes(key_file, json.dumps(key, indent=2, sort_keys=True, default=str).encode())
        except OSError as e:
            raise HarnessError(f"run.store_dir={str(root)!r} is not writable ({e.strerror})") from None

    @classmethod
    def existing(cls, directory: str | Path) -> "ImageStore":
        """Reopen a store directory (as recorded in a run's ``store`` field)."""
        directory = Path(directory)
        key_file = directory / "key.json"
        if not key_file.is_file():
            raise HarnessError(f"{directory} is not an image store (no key.json)")
        store = cls.__new__(cls)
        store.key, store.dir = json.loads(key_file.read_text()), directory
        return store

    def shards(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.dir.iterdir():
            m = _SHARD.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(out)

    def present(self) -> set[int]:
        return {i for start, stop, _ in self.shards() for i in range(start, stop)}

    def missing(self, indices: range) -> list[int]:
        have = self.present()
        return [i for i in indices if i not in have]

    def write(self, start: int, images: np.ndarray) -> Path:
        """Write the images of samples ``start .. start + len(images) - 1``."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
        stop = start + len(images)
        path = self.dir / f"samples_{start:07d}_{stop:07d}.npz"
        atomic_write(path, lambda f: np.savez(f, arr_0=images, indices=np.arange(start, stop)))
        return path

    def load(self, indices: range) -> np.ndarray:
        """The images of ``indices`` in order; every one must be present."""
        missing = self.missing(indices)
        if missing:
            raise HarnessError(f"{len(missing)} samples missing from {self.dir} (first: {missing[0]})")
        want = set(indices)
        parts: dict[int, np.ndarray] = {}
        for start, stop, path in self.shards():
            if stop <= indices.start or start >= indices.stop:
                continue
            with np.load(path) as z:
                arr, idx = z["arr_0"], z["indices"]
            for i, img in zip(idx.tolist(), arr):
                if i in want and i not in parts:
                    parts[i] = img
        return np.stack([parts[i] for i in indices])


def missing_runs(missing: list[int], batch_size: int) -> Iterator[range]:
    """Contiguous runs of missing indices, cut into batches of at most ``batch_size``."""
    run: list[int] = []
    for i in missing:
        if run and (i != run[-1] + 1 or len(run) == batch_size):
            yield range(run[0], run[-1] + 1)
            run = []
        run.append(i)
    if run:
        yield range(run[0], run[-1] + 1)


def shard_range(num_samples: int, shards: int, shard: int) -> range:
    """The sample indices of shard ``shard`` of ``shards`` (contiguous, balanced)."""
    if shards < 1 or shards > num_samples:
        raise HarnessError(
            f"run.shards={shards} must be between 1 and run.num_samples={num_samples}"
        )
    if not 0 <= shard < shards:
        raise HarnessError(f"run.shard={shard} must be between 0 and run.shards-1={shards - 1}")
    bounds = np.linspace(0, num_samples, shards + 1).round().astype(int)
    return range(int(bounds[shard]), int(bounds[shard + 1]))
