"""Generated images on disk, keyed by the settings that change them.

A store directory is ``<store_dir>/<sha256 of the key>/`` holding ``key.json`` and
shards ``samples_<start>_<stop>.npz`` (``arr_0``: uint8 N x H x W x C, the ADM
evaluator's layout; ``indices``: the sample indices). Shards are written atomically
(temp file + rename), so a killed run leaves only complete shards, and a rerun with
the same settings generates exactly the samples that are missing. The key is made of
what changes images (model weights, sampler, steps, cache settings, seed), never of
the output directory, so a sweep's jobs share the uncached baseline.

Integrity. Beside each shard, its manifest entry ``samples_<start>_<stop>.npz.json``
records when it is written its index range, its image count, its size and the sha256
of its bytes. One small file per shard, each written atomically after its shard:
processes that write different shards of one store at the same time (torchrun ranks,
SLURM array jobs) never rewrite each other's entries, as they would in one shared
manifest file; processes that write the *same* shard (two sweep jobs sharing a
baseline) write the same bytes (:func:`npz_bytes` fixes the zip's timestamps), so
whichever shard and entry win the renames agree. A shard is used only once verified
(:func:`shard_problem`); shards written before manifests existed are checked by their
structure instead. A damaged shard met by a run (:meth:`ImageStore.missing`) is moved
into ``<key dir>/damaged/`` and its samples generated again -- a sample depends only on
the seed and its index, so the healed store holds the same images; met by a read-only
use (:meth:`ImageStore.load`) it is a one-line error saying how to heal it;
``python -m bench.store verify <store_dir> [--repair]`` checks (and heals) a whole store.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bench.core.errors import HarnessError, one_line
from metrics.files import atomic_write_bytes

STORE_VERSION = 1
_SHARD = re.compile(r"^samples_(\d{7})_(\d{7})\.npz$")
DAMAGED = "damaged"  # the folder of a key directory that damaged shards are moved into
HEAL = "python -m bench.store verify {} --repair"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def key_digest(key: dict[str, Any]) -> str:
    blob = json.dumps({"store_version": STORE_VERSION, **key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def manifest_path(shard: Path) -> Path:
    """The manifest entry of ``shard``: ``samples_<start>_<stop>.npz.json`` beside it."""
    return shard.with_name(shard.name + ".json")


def npz_bytes(images: np.ndarray, indices: np.ndarray) -> bytes:
    """The ``.npz`` that ``np.savez(f, arr_0=images, indices=indices)`` writes (stored
    members ``arr_0.npy`` and ``indices.npy``, zip64), but with every member dated
    1980-01-01 instead of now: the same images give the same bytes, whoever writes them
    and when, so their sha256 is a property of the images."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in (("arr_0", images), ("indices", indices)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)" if n >= 2**20 else f"{n} bytes"


def _structure_problem(path: Path, start: int, stop: int) -> str | None:
    """What is wrong with the shard's contents, read whole (the zip's CRC-32 checked)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"arr_0", "indices"} <= set(z.files):
                return f"holds {sorted(z.files)}, not arr_0 and indices"
            arr, idx = z["arr_0"], z["indices"]
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure to read it is damage: BadZipFile, Bad CRC-32, bad header
        return f"unreadable ({one_line(e, typed=True)})"
    n = stop - start
    if arr.dtype != np.uint8 or arr.ndim != 4:
        return f"arr_0 is {arr.dtype} {tuple(arr.shape)}, not uint8 N x H x W x C images"
    if len(arr) != n:
        return f"holds {len(arr)} images, its name says {n}"
    if idx.shape != (n,) or not np.array_equal(idx, np.arange(start, stop)):
        return f"its indices are not {start}..{stop - 1}"
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check(path: Path, start: int, stop: int) -> str | None:
    entry_path = manifest_path(path)
    try:
        entry = json.loads(entry_path.read_text())
    except FileNotFoundError:
        return _structure_problem(path, start, stop)  # written before manifests: its structure is the check
    except (OSError, ValueError) as e:
        return f"its manifest entry {entry_path.name} is unreadable ({one_line(e, typed=True)})"
    if not isinstance(entry, dict) or [entry.get(k) for k in ("start", "stop", "count")] != [start, stop, stop - start]:
        return f"its manifest entry {entry_path.name} does not describe samples {start}..{stop - 1}"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        what = "truncated" if isinstance(entry.get("bytes"), int) and size < entry["bytes"] else "rewritten"
        detail = _structure_problem(path, start, stop)
        return f"{what}: {size} bytes, written as {entry.get('bytes')}" + (f"; {detail}" if detail else "")
    if _sha256(path) != entry.get("sha256"):
        detail = _structure_problem(path, start, stop)
        return "its sha256 differs from the one recorded when it was written" + (f" ({detail})" if detail else "")
    return None


_VERIFIED: dict[tuple, str | None] = {}


def shard_problem(path: Path, start: int, stop: int) -> str | None:
    """What is wrong with the shard ``path`` (named for samples ``start..stop-1``); None
    when it is intact.

    With a manifest entry: the entry's range and count match the name, and the file's size
    and sha256 match the entry. Without one (a shard written before manifests existed):
    opened as an ``.npz`` whose ``indices`` are ``start..stop-1`` and whose ``arr_0`` holds
    that many uint8 images. Either way the check reads the whole file once: a 12 MiB
    shard (64 ImageNet-256 images) takes ~12 ms from the page cache on a 2-core x86_64 VM
    (sha256 ~1 GB/s), so a 50k-image ImageNet store (~800 shards, ~10 GB) costs ~10 s plus
    the disk read, a 50k-image CIFAR-10 store (~150 MB) well under a second. The verdict
    is kept per process, by path, size, mtime, inode and the manifest entry's
    (FileNotFoundError when the shard is gone), so each shard is read once per process
    however often runs ask (a sweep's jobs share the baseline's store); a shard replaced
    or rewritten is checked again -- except bytes changed in place, same size, within the
    file system's timestamp granularity of this process's check, which the next process sees.
    """
    st = path.stat()
    try:
        es = manifest_path(path).stat()
        entry = (es.st_size, es.st_mtime_ns, es.st_ino)
    except FileNotFoundError:
        entry = None
    key = (str(path), start, stop, st.st_size, st.st_mtime_ns, st.st_ino, entry)
    if key not in _VERIFIED:
        _VERIFIED[key] = _check(path, start, stop)
    return _VERIFIED[key]


def forget_verified() -> None:
    """Drop the verdicts kept by :func:`shard_problem` (as a new process would start)."""
    _VERIFIED.clear()


@dataclass(frozen=True)
class Damage:
    """A damaged shard: where, what is wrong, where it was moved (None: not moved)."""

    path: Path
    start: int
    stop: int
    problem: str
    moved_to: Path | None = None


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
        """Every shard file by its name, verified or not."""
        out = []
        for p in self.dir.iterdir():
            m = _SHARD.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(out)

    def verify(self, indices: range | None = None) -> tuple[list[tuple[int, int, Path]], list[Damage]]:
        """The intact shards and the damaged ones among those holding any of ``indices``
        (all when None), by :func:`shard_problem`; a shard that vanishes meanwhile (moved
        aside by another process) is in neither."""
        good, bad = [], []
        for start, stop, path in self.shards():
            if indices is not None and (stop <= indices.start or start >= indices.stop):
                continue
            try:
                problem = shard_problem(path, start, stop)
            except FileNotFoundError:
                continue
            if problem is None:
                good.append((start, stop, path))
            else:
                bad.append(Damage(path, start, stop, problem))
        return good, bad

    def set_aside(self, damage: Damage) -> Damage:
        """Move a damaged shard and its manifest entry into ``damaged/``, named with the UTC
        time (never deleted: the user may want to look at it). ``moved_to`` is None when
        another process moved it first."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.dir / DAMAGED
        dest = aside / f"{damage.path.name}.{stamp}"
        n = 1
        while dest.exists() or manifest_path(dest).exists():
            dest, n = aside / f"{damage.path.name}.{stamp}-{n}", n + 1
        try:
            aside.mkdir(exist_ok=True)
            os.rename(damage.path, dest)
        except FileNotFoundError:
            return damage
        except OSError as e:
            raise HarnessError(
                f"image shard {damage.path} is damaged ({damage.problem}) and cannot be moved aside "
                f"into {aside} ({e.strerror}); move or delete it by hand"
            ) from None
        try:
            os.rename(manifest_path(damage.path), f"{dest}.json")
        except FileNotFoundError:
            pass
        except OSError:
            pass  # the entry stays; without its shard it is never read
        return Damage(damage.path, damage.start, damage.stop, damage.problem, dest)

    def present(self) -> set[int]:
        """The samples of intact shards (damaged ones are left where they are)."""
        good, _ = self.verify()
        return {i for start, stop, _ in good for i in range(start, stop)}

    def missing(self, indices: range) -> list[int]:
        """The samples of ``indices`` not in an intact shard, to generate.

        A damaged shard holding any of them is moved aside (:meth:`set_aside`) with one
        warning line on stderr, and its samples count as missing: the run generates them
        again, the same images (a sample depends only on the seed and its index)."""
        good, bad = self.verify(indices)
        for d in bad:
            moved = self.set_aside(d)
            where = f"moved to {moved.moved_to}" if moved.moved_to else "already moved aside by another process"
            print(f"warning: damaged image shard {d.path}: {d.problem}; {where}; its {d.stop - d.start} "
                  "samples are generated again", file=sys.stderr)
        have = {i for start, stop, _ in good for i in range(start, stop)}
        return [i for i in indices if i not in have]

    def _damaged(self, path: Path, problem: str) -> HarnessError:
        return HarnessError(
            f"damaged image shard {path}: {problem}; heal the store with `{HEAL.format(self.dir.parent)}` "
            "and rerun the command that generated it (or just rerun that command: a run moves damaged "
            "shards aside and generates their samples again)"
        )

    def write(self, start: int, images: np.ndarray) -> Path:
        """Write the images of samples ``start .. start + len(images) - 1``, then their
        manifest entry. A write that fails (disk full) is one-line HarnessError naming the
        store and the space the shard needs, and leaves neither file behind."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
        stop = start + len(images)
        path = self.dir / f"samples_{start:07d}_{stop:07d}.npz"
        data = npz_bytes(images, np.arange(start, stop))
        entry = {"start": start, "stop": stop, "count": stop - start, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(), "shape": list(images.shape), "dtype": "uint8"}
        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            raise self._write_error(path, len(data), e) from None
        try:
            atomic_write_bytes(manifest_path(path), (json.dumps(entry, indent=1) + "\n").encode())
        except OSError as e:
            path.unlink(missing_ok=True)
            raise self._write_error(manifest_path(path), len(data), e) from None
        return path

    def _write_error(self, path: Path, size: int, e: OSError) -> HarnessError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return HarnessError(
                f"no space left for the image store {self.dir} (run.store_dir): {path.name} needs "
                f"{_size(size)}; free space there or set run.store_dir to a disk with room"
            )
        return HarnessError(f"cannot write {path} in the image store (run.store_dir): {e.strerror or one_line(e)}")

    def load(self, indices: range) -> np.ndarray:
        """The images of ``indices`` in order; every one must be present, in an intact shard.

        Read-only: a damaged shard is a one-line HarnessError naming it and how to heal it."""
        good, bad = self.verify(indices)
        if bad:
            k = len(bad) - 1
            more = f" (and {k} more damaged shard{'s' if k > 1 else ''})" if k else ""
            raise self._damaged(bad[0].path, bad[0].problem + more)
        have = {i for start, stop, _ in good for i in range(start, stop)}
        missing = [i for i in indices if i not in have]
        if missing:
            raise HarnessError(f"{len(missing)} samples missing from {self.dir} (first: {missing[0]})")
        want = set(indices)
        parts: dict[int, np.ndarray] = {}
        for start, stop, path in good:
            try:
                with np.load(path, allow_pickle=False) as z:
                    arr, idx = z["arr_0"], z["indices"]
            except Exception as e:  # noqa: BLE001 -- changed on disk since it was verified
                raise self._damaged(path, f"unreadable ({one_line(e, typed=True)})") from None
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


@dataclass
class StoreReport:
    """What :func:`verify_store` found: key directories, shards and images checked, damage."""

    keys: int = 0
    shards: int = 0
    images: int = 0
    damaged: list[Damage] | None = None


def key_dirs(path: str | Path) -> list[Path]:
    """The key directories of a store directory (or ``path`` itself when it is one)."""
    path = Path(path)
    if (path / "key.json").is_file():
        return [path]
    if not path.is_dir():
        raise HarnessError(f"{path}: no such directory (give run.store_dir, e.g. .cache/store, or one key directory)")
    found = sorted(p for p in path.iterdir() if (p / "key.json").is_file())
    if not found:
        raise HarnessError(f"{path} is not an image store: no key.json in it or in its subdirectories")
    return found


def verify_store(path: str | Path, *, repair: bool = False) -> StoreReport:
    """Check every shard of every key directory under ``path``; with ``repair`` move the
    damaged ones aside (their samples are generated by the next run with those settings)."""
    report = StoreReport(damaged=[])
    for d in key_dirs(path):
        store = ImageStore.existing(d)
        report.keys += 1
        good, bad = store.verify()
        report.shards += len(good) + len(bad)
        report.images += sum(stop - start for start, stop, _ in good) + sum(b.stop - b.start for b in bad)
        report.damaged += [store.set_aside(b) for b in bad] if repair else bad
    return report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        print(f"error: {message} (python -m bench.store --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.store verify <store_dir> [--repair]``: 0 clean or repaired, 1 damage
    found (without --repair), 2 bad input."""
    parser = _Parser(prog="python -m bench.store", description="Check the image store's shards.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    v = sub.add_parser("verify", help="check every shard against its manifest entry (or its structure)")
    v.add_argument("store_dir", help="run.store_dir (every key directory in it) or one key directory")
    v.add_argument("--repair", action="store_true",
                   help="move damaged shards into <key dir>/damaged/; the next run generates their samples again")
    args = parser.parse_args(argv)
    try:
        report = verify_store(args.store_dir, repair=args.repair)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in report.damaged:
        moved = f"; moved to {d.moved_to}" if d.moved_to else ""
        print(f"damaged: {d.path}: {d.problem}{moved}")
    n = len(report.damaged)
    summary = (f"{report.keys} key director{'y' if report.keys == 1 else 'ies'}, {report.shards} shards, "
               f"{report.images} images checked: {n} damaged")
    if n and args.repair:
        print(f"{summary}; moved aside into <key dir>/{DAMAGED}/: the next run with the same settings "
              "generates their samples again")
        return 0
    if n:
        print(f"{summary}; `{HEAL.format(args.store_dir)}` moves them aside (the next run then generates "
              "their samples again)")
        return 1
    print(summary)
    return 0
