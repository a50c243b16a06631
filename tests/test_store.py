"""The image store's integrity: manifest entries, damaged shards healed or named, verify, disk full."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.core.errors import HarnessError
from bench.run.runner import run
from bench.sampling import store as store_mod
from bench.sampling.store import ImageStore, main, manifest_path
from harness import ROOT, compose_cfg

KEY = {"test": "store"}


@pytest.fixture(autouse=True)
def fresh_process():
    """Each test starts as a new process would: no verdicts kept (damage done in place within
    the mtime granularity of a shard just verified would otherwise go unseen, as documented)."""
    store_mod.forget_verified()
    yield
    store_mod.forget_verified()


def _images(start: int, n: int) -> np.ndarray:
    """Tiny images that depend only on their index, like the harness's samples."""
    rngs = (np.random.default_rng(i) for i in range(start, start + n))
    return np.stack([r.integers(0, 256, (8, 8, 3), dtype=np.uint8) for r in rngs])


def _filled(root: Path, shards=((0, 64), (64, 128))) -> ImageStore:
    store = ImageStore(root, KEY)
    for a, b in shards:
        store.write(a, _images(a, b - a))
    return store


def truncate(path: Path) -> None:
    os.truncate(path, 1000)


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def ten_of_64(path: Path) -> None:
    """A valid .npz under the shard's name holding only its first 10 images."""
    with np.load(path) as z:
        arr, idx = z["arr_0"][:10], z["indices"][:10]
    with open(path, "wb") as f:
        np.savez(f, arr_0=arr, indices=idx)


def ten_of_64_legacy(path: Path) -> None:
    """The same, for a shard written before manifest entries existed."""
    ten_of_64(path)
    manifest_path(path).unlink()


def garbled_entry(path: Path) -> None:
    manifest_path(path).write_text("{not json")


DAMAGE = {
    "truncated": (truncate, "truncated: 1000 bytes, written as"),
    "flipped": (flip_middle_byte,
                "sha256 differs from the one recorded when it was written (unreadable (BadZipFile: Bad CRC-32"),
    "ten_of_64": (ten_of_64, "holds 10 images, its name says 64"),
    "ten_of_64_legacy": (ten_of_64_legacy, "holds 10 images, its name says 64"),
    "garbled_entry": (garbled_entry, "manifest entry samples_0000064_0000128.npz.json is unreadable"),
}


def test_a_shard_has_a_manifest_entry_and_the_same_images_give_the_same_bytes(tmp_path):
    a, b = _filled(tmp_path / "a"), _filled(tmp_path / "b")
    path = a.dir / "samples_0000000_0000064.npz"
    entry = json.loads(manifest_path(path).read_text())
    data = path.read_bytes()
    assert entry["start"] == 0 and entry["stop"] == 64 and entry["count"] == 64 and entry["bytes"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert (b.dir / path.name).read_bytes() == data  # no timestamp in the zip: bytes are a property of the images
    with np.load(path) as z:  # what np.savez would have written, as far as np.load tells
        assert np.array_equal(z["arr_0"], _images(0, 64)) and np.array_equal(z["indices"], np.arange(64))
    assert sorted(p.name for p in a.dir.iterdir()) == [
        "key.json", "samples_0000000_0000064.npz", "samples_0000000_0000064.npz.json",
        "samples_0000064_0000128.npz", "samples_0000064_0000128.npz.json"]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_shard_is_moved_aside_and_its_samples_regenerated(tmp_path, capsys, damage):
    store = _filled(tmp_path)
    original = store.load(range(128))
    path = store.dir / "samples_0000064_0000128.npz"
    good_bytes = path.read_bytes()
    hurt, problem = DAMAGE[damage]
    hurt(path)
    assert store.missing(range(128)) == list(range(64, 128))
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: damaged image shard {path}: ")
    assert problem in warning[0] and "its 64 samples are generated again" in warning[0]
    assert not path.exists() and not manifest_path(path).exists()  # moved, not deleted
    aside = sorted((store.dir / "damaged").iterdir())  # the shard, then its entry (when it had one)
    assert [p.name.startswith(path.name + ".") for p in aside] == [True] * len(aside)
    assert f"moved to {aside[0]};" in warning[0] and not aside[0].name.endswith(".json")
    # the run's rewrite: the same images, the same bytes
    store.write(64, _images(64, 64))
    assert path.read_bytes() == good_bytes
    assert store.missing(range(128)) == [] and np.array_equal(store.load(range(128)), original)
    assert capsys.readouterr().err == ""


def test_only_shards_holding_the_asked_samples_are_checked(tmp_path, capsys):
    store = _filled(tmp_path)
    truncate(store.dir / "samples_0000064_0000128.npz")
    assert store.missing(range(64)) == []  # another rank's part: not this one's business
    assert capsys.readouterr().err == "" and (store.dir / "samples_0000064_0000128.npz").exists()


def test_a_shard_another_process_moved_aside_first_is_just_missing(tmp_path, capsys):
    """Two ranks whose parts share a damaged shard both find it; one moves it, the other
    finds it gone: no error, its samples are missing for both."""
    store = _filled(tmp_path)
    path = store.dir / "samples_0000000_0000064.npz"
    truncate(path)
    _, bad = store.verify(range(64))
    path.rename(tmp_path / "elsewhere.npz")
    assert store.set_aside(bad[0]).moved_to is None
    assert store.missing(range(128)) == list(range(64)) and capsys.readouterr().err == ""


def test_shards_written_before_manifests_are_read_and_checked_by_their_structure(tmp_path, capsys):
    store = ImageStore(tmp_path, KEY)
    for a in (0, 64):
        np.savez(store.dir / f"samples_{a:07d}_{a + 64:07d}.npz", arr_0=_images(a, 64), indices=np.arange(a, a + 64))
    assert store.missing(range(128)) == [] and np.array_equal(store.load(range(128)), _images(0, 128))
    flip_middle_byte(store.dir / "samples_0000000_0000064.npz")
    store_mod.forget_verified()
    assert store.missing(range(128)) == list(range(64))
    assert "unreadable (BadZipFile: Bad CRC-32 for file 'arr_0.npy')" in capsys.readouterr().err


def test_load_names_a_damaged_shard_and_how_to_heal_it_and_moves_nothing(tmp_path):
    store = _filled(tmp_path)
    path = store.dir / "samples_0000000_0000064.npz"
    truncate(path)
    with pytest.raises(HarnessError) as e:
        store.load(range(128))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"damaged image shard {path}: truncated: 1000 bytes")
    assert f"python -m bench.store verify {tmp_path} --repair" in msg and "rerun" in msg
    assert path.exists() and not (store.dir / "damaged").exists()
    assert store.present() == set(range(64, 128))  # counted without the damaged shard, which stays


def test_each_shard_is_verified_once_per_process_until_it_changes(tmp_path, monkeypatch):
    store = _filled(tmp_path)
    checked = []
    real = store_mod._check
    monkeypatch.setattr(store_mod, "_check", lambda p, a, b: checked.append(p.name) or real(p, a, b))
    store.missing(range(128))
    store.load(range(128))
    ImageStore.existing(store.dir).missing(range(128))
    assert sorted(checked) == ["samples_0000000_0000064.npz", "samples_0000064_0000128.npz"]
    store.write(0, _images(0, 64))  # replaced (a new file): checked again
    store.missing(range(128))
    assert checked[2:] == ["samples_0000000_0000064.npz"]


def test_verify_reports_repairs_and_rejects_what_is_not_a_store(tmp_path, capsys):
    root = tmp_path / "store"
    store = _filled(root)
    ImageStore(root, {"other": 1}).write(0, _images(0, 4))
    assert main(["verify", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "2 key directories, 3 shards, 132 images checked: 0 damaged"
    bad = store.dir / "samples_0000000_0000064.npz"
    flip_middle_byte(bad)
    store_mod.forget_verified()
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith(f"damaged: {bad}: its sha256 differs")
    assert out[1].startswith("2 key directories, 3 shards, 132 images checked: 1 damaged; `python -m bench.store verify")
    assert bad.exists()  # without --repair nothing moves
    assert main(["verify", str(store.dir), "--repair"]) == 0  # one key directory
    out = capsys.readouterr().out
    assert "moved to" in out and "the next run with the same settings generates their samples again" in out
    assert not bad.exists() and len(list((store.dir / "damaged").iterdir())) == 2
    assert main(["verify", str(root)]) == 0
    assert capsys.readouterr().out.strip() == "2 key directories, 2 shards, 68 images checked: 0 damaged"
    (tmp_path / "empty").mkdir()
    for arg in (tmp_path / "nowhere", tmp_path / "empty"):
        assert main(["verify", str(arg)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {arg}") and "\n" not in err


@pytest.mark.integration
def test_verify_as_a_user_runs_it(tmp_path):
    store = _filled(tmp_path)
    truncate(store.dir / "samples_0000064_0000128.npz")
    r = subprocess.run([sys.executable, "-m", "bench.store", "verify", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == ""
    assert r.stdout.splitlines()[0].startswith(f"damaged: {store.dir}/samples_0000064_0000128.npz: truncated")


def _disk_full_after(n_bytes: int, which: str):
    """A writer that writes part of the file, then finds the disk full (for ``which`` files)."""
    from metrics.files import atomic_write, atomic_write_bytes

    def write(path, data):
        if not Path(path).name.endswith(which):
            return atomic_write_bytes(path, data)

        def partial(f):
            f.write(data[:n_bytes])
            raise OSError(errno.ENOSPC, "No space left on device")

        return atomic_write(path, partial)

    return write


@pytest.mark.parametrize("which", [".npz", ".npz.json"])
def test_disk_full_is_one_line_naming_the_store_and_the_space_and_leaves_nothing(tmp_path, monkeypatch, which):
    store = ImageStore(tmp_path, KEY)
    monkeypatch.setattr(store_mod, "atomic_write_bytes", _disk_full_after(100, which))
    with pytest.raises(HarnessError) as e:
        store.write(0, _images(0, 64))
    size = len(store_mod.npz_bytes(_images(0, 64), np.arange(64)))
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None and e.value.__suppress_context__
    assert msg.startswith(f"no space left for the image store {store.dir} (run.store_dir): samples_0000000_0000064")
    assert f"needs {size} bytes" in msg
    assert [p.name for p in store.dir.iterdir()] == ["key.json"]  # no shard, no entry, no temp file


FAST = ["sampler.steps=10", "run.progress=false", "run.timing=off", "run.mode=generate", "run.num_samples=16",
        "run.batch_size=4", "run.baseline_images=false"]


def test_a_rerun_heals_damaged_shards_with_the_same_images(tmp_path, capsys):
    """Through the runner on the digits model: generate, damage three shards three ways, rerun;
    the store then holds the bytes of the first run."""
    cfg = compose_cfg(*FAST, f"run.store_dir={tmp_path}/store")
    rec = json.loads(run(cfg, tmp_path / "o1").read_text())
    d = Path(rec["store"])
    clean = {p.name: p.read_bytes() for p in d.glob("samples_*")}
    assert len(clean) == 8  # 4 shards, 4 entries
    truncate(d / "samples_0000000_0000004.npz")
    flip_middle_byte(d / "samples_0000004_0000008.npz")
    few = d / "samples_0000008_0000012.npz"  # an old-style shard (no entry) holding 2 of its 4 images
    with np.load(few) as z:
        arr, idx = z["arr_0"][:2], z["indices"][:2]
    with open(few, "wb") as f:
        np.savez(f, arr_0=arr, indices=idx)
    manifest_path(few).unlink()
    store_mod.forget_verified()
    capsys.readouterr()
    again = json.loads(run(compose_cfg(*FAST, f"run.store_dir={tmp_path}/store"), tmp_path / "o2").read_text())
    assert again["status"] == "ok" and again["generation"]["generated"] == 12 and again["generation"]["reused"] == 4
    warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning: damaged image shard")]
    assert len(warnings) == 3
    assert {p.name: p.read_bytes() for p in d.glob("samples_*")} == clean
    assert len(list((d / "damaged").iterdir())) == 5  # three shards, two entries (the old-style one had none)


@pytest.mark.integration
def test_disk_full_during_a_run_exits_2_with_one_line(tmp_path):
    """`python run.py` as a user runs it, with the store's writer finding the disk full."""
    code = (
        "import sys, errno; from bench.sampling import store\n"
        "def full(path, data): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "store.atomic_write_bytes = lambda p, d, _w=store.atomic_write_bytes: "
        "full(p, d) if str(p).endswith('.npz') else _w(p, d)\n"
        "from bench.cli import main; sys.argv[0] = 'run.py'; main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *FAST, f"run.store_dir={tmp_path}/store", f"hydra.run.dir={tmp_path}/out"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith(f"error: no space left for the image store {tmp_path}/store/")
    assert "samples_0000000_0000004.npz needs" in lines[-1] and "Traceback" not in r.stderr
    assert not list((tmp_path / "store").glob("*/*samples_*"))
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"
