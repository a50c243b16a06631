"""Reference statistics: load them, compute what is missing, cache it by content.

A :class:`Reference` is a set of real images and/or precomputed statistics:

* an ADM reference batch ``.npz`` (openai/guided-diffusion evaluations, e.g.
  ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` uint8 N x H x W x 3 images and
  precomputed ``mu, sigma`` (pool3) and ``mu_s, sigma_s`` (spatial) -- see
  :func:`from_adm_npz`;
* a pytorch-fid style ``.npz`` with ``mu, sigma`` only (:func:`from_stats_npz`);
* an image folder (:func:`from_folder`), an in-memory uint8 array
  (:func:`from_array`), or a Hugging Face ``datasets`` dataset
  (:func:`from_hf_dataset`).

:meth:`Reference.resolve` returns, for a given extractor, the statistics
``(mu, sigma)`` per feature layer and the first ``pr_count`` (10k, as ADM)
"pool" features for precision/recall.  Precomputed statistics are used only
when they were made by an extractor of the same name (ADM and pytorch-fid
statistics come from the TF Inception graph, i.e. ``inception-v3-compat``),
as the ADM evaluator does (``read_statistics``); everything else is computed
with ONE extraction pass and cached on disk.

Cache key: sha256 over (``PROTOCOL_VERSION``, a content hash of the inputs,
``extractor.cache_id``, layer, what is stored) -- never a name alone.  Entries
are written atomically (temp file in the cache directory + ``os.replace``) and
store their key, which is checked on load.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metrics.files import atomic_write
from metrics.features import INCEPTION_NAME, FeatureExtractor, check_images
from metrics.fid import statistics
from metrics.hashing import array_digest, file_digest, new_hasher, update_with_array

__all__ = [
    "PROTOCOL_VERSION",
    "PR_REFERENCE_COUNT",
    "ADM_NPZ_KEYS",
    "Reference",
    "ResolvedReference",
    "from_adm_npz",
    "from_stats_npz",
    "from_folder",
    "from_array",
    "from_hf_dataset",
    "load_reference",
    "as_reference",
    "cache_key",
]

#: Bump when a change to feature extraction or statistics changes cached values.
PROTOCOL_VERSION = 1
#: ADM computes precision/recall against the 10k images of its reference batch.
PR_REFERENCE_COUNT = 10_000
#: npz keys of each layer's precomputed statistics (ADM reference batch layout).
STATS_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
ADM_NPZ_KEYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ResolvedReference:
    """What the metrics need from a reference for one extractor."""

    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (mu, sigma)
    pr_features: np.ndarray | None  # first pr_count "pool" features, or None if not requested


@dataclass
class Reference:
    """Real images (loaded lazily) and/or statistics precomputed by extractor ``stats_extractor``."""

    source: str  # for messages and records
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    stats_extractor: str | None = None
    load_images: Callable[[], np.ndarray] | None = None
    digest: Callable[[], str] | None = None  # content hash of the inputs
    _images: np.ndarray | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)

    def __post_init__(self):
        for layer, (mu, sigma) in self.stats.items():
            if np.ndim(mu) != 1 or np.shape(sigma) != (len(mu), len(mu)):
                raise ValueError(f"{self.source}: {layer} statistics have shapes {np.shape(mu)} and {np.shape(sigma)}")

    @property
    def has_images(self) -> bool:
        return self.load_images is not None

    def images(self) -> np.ndarray:
        if self.load_images is None:
            raise ValueError(f"reference {self.source} holds statistics only, no images")
        if self._images is None:
            self._images = check_images(self.load_images())
        return self._images

    def content_hash(self) -> str:
        if self._digest is None:
            self._digest = self.digest() if self.digest is not None else array_digest(self.images())
        return self._digest

    def resolve(
        self,
        extractor: FeatureExtractor,
        layers: Sequence[str] = ("pool",),
        pr_count: int = 0,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> ResolvedReference:
        """Statistics for ``layers`` and the first ``pr_count`` pool features, computing missing ones in one pass."""
        stats = {l: self.stats[l] for l in layers if l in self.stats and self.stats_extractor == extractor.name}
        missing = [l for l in layers if l not in stats]
        pr_features = None
        cache = _Cache(cache_dir) if cache_dir is not None and (missing or pr_count) and self.has_images else None

        def key(layer: str, what: str) -> str:
            return cache_key(self.content_hash(), extractor.cache_id, layer, what)

        if cache is not None:
            for layer in list(missing):
                entry = cache.load(key(layer, "stats"))
                if entry is not None:
                    stats[layer] = (entry["mu"], entry["sigma"])
                    missing.remove(layer)
            if pr_count:
                entry = cache.load(key("pool", f"features[:{pr_count}]"))
                pr_features = None if entry is None else entry["features"]

        if missing or (pr_count and pr_features is None):
            if not self.has_images:
                what = ", ".join(missing) or "precision/recall"
                made_by = f" (its statistics are from {self.stats_extractor})" if self.stats else ""
                raise ValueError(
                    f"reference {self.source} has no images to compute {what} with {extractor.name}{made_by}"
                )
            images = self.images()
            n = len(images) if missing else min(pr_count, len(images))
            features = extractor.extract(images[:n], batch_size=batch_size, progress=progress)
            for layer in missing:
                if layer not in features:
                    raise ValueError(f"extractor {extractor.name} gives no {layer!r} features (has {sorted(features)})")
                stats[layer] = statistics(features[layer])
                if cache is not None:
                    cache.save(key(layer, "stats"), mu=stats[layer][0], sigma=stats[layer][1])
            if pr_count and pr_features is None:
                pr_features = np.asarray(features["pool"][:pr_count], dtype=np.float64)
                if cache is not None:
                    cache.save(key("pool", f"features[:{pr_count}]"), features=_compact(pr_features))
        if pr_features is not None:
            pr_features = np.asarray(pr_features, dtype=np.float64)
        return ResolvedReference(stats=stats, pr_features=pr_features)


def cache_key(content_hash: str, extractor_id: str, layer: str, what: str) -> str:
    """sha256 over protocol version, input content hash, extractor id, layer and stored quantity."""
    fields = {
        "protocol": PROTOCOL_VERSION,
        "content": content_hash,
        "extractor": extractor_id,
        "layer": layer,
        "what": what,
    }
    h = new_hasher()
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


def _compact(features: np.ndarray) -> np.ndarray:
    """float32 when that is lossless (float32 networks), else float64."""
    as32 = features.astype(np.float32)
    return as32 if np.array_equal(as32, features) else features


class _Cache:
    """Directory of ``<key>.npz`` entries; each stores its own key under ``"key"``."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.npz"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path) as npz:
            if str(npz["key"]) != key:
                return None
            return {name: npz[name] for name in npz.files if name != "key"}

    def save(self, key: str, **arrays: np.ndarray) -> Path:
        return atomic_write(self.path(key), lambda f: np.savez(f, key=np.asarray(key), **arrays), fsync=True)


# ----------------------------------------------------------------------------------------- constructors


def _require_keys(npz, keys: Sequence[str], path) -> None:
    for key in keys:
        if key not in npz.files:
            raise ValueError(f"{path}: missing key {key!r} (has {sorted(npz.files)})")


def _npz_stats(npz, path, layers: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    _require_keys(npz, [k for layer in layers for k in STATS_KEYS[layer]], path)
    return {layer: tuple(np.asarray(npz[k], dtype=np.float64) for k in STATS_KEYS[layer]) for layer in layers}


def from_adm_npz(path: str | os.PathLike, stats_extractor: str = INCEPTION_NAME) -> Reference:
    """ADM reference batch: ``arr_0`` images plus, when precomputed, ``mu, sigma`` and
    ``mu_s, sigma_s`` (each pair complete or absent; absent statistics are computed)."""
    with np.load(path) as npz:
        _require_keys(npz, ("arr_0",), path)  # without reading arr_0
        layers = [layer for layer in ("pool", "spatial") if any(k in npz.files for k in STATS_KEYS[layer])]
        stats = _npz_stats(npz, path, layers)

    def load_images() -> np.ndarray:
        with np.load(path) as npz:
            return npz["arr_0"]

    return Reference(
        source=str(path),
        stats=stats,
        stats_extractor=stats_extractor,
        load_images=load_images,
        digest=lambda: file_digest(path),
    )


def from_stats_npz(path: str | os.PathLike, stats_extractor: str = INCEPTION_NAME) -> Reference:
    """pytorch-fid style statistics: ``mu, sigma`` (required), ``mu_s, sigma_s`` (optional); no images."""
    with np.load(path) as npz:
        layers = ["pool"] + (["spatial"] if "mu_s" in npz.files or "sigma_s" in npz.files else [])
        stats = _npz_stats(npz, path, layers)
    return Reference(source=str(path), stats=stats, stats_extractor=stats_extractor, digest=lambda: file_digest(path))


def from_array(images: np.ndarray, source: str = "in-memory array") -> Reference:
    """uint8 N x H x W x C images held in memory."""
    images = check_images(images)
    return Reference(source=source, load_images=lambda: images, digest=lambda: array_digest(images))


def _pil_to_array(image, mode: str) -> np.ndarray:
    array = np.asarray(image.convert(mode), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _stack(arrays: list[np.ndarray], names: Sequence[str], source: str) -> np.ndarray:
    if not arrays:
        raise ValueError(f"reference {source} holds no images")
    for array, name in zip(arrays, names):
        if array.shape != arrays[0].shape:
            raise ValueError(f"reference {source}: {name} is {array.shape}, the first image is {arrays[0].shape}")
    return np.stack(arrays)


def from_folder(path: str | os.PathLike, mode: str = "RGB", limit: int | None = None) -> Reference:
    """Images under ``path`` (recursive, sorted by relative path), converted to PIL ``mode`` ("RGB" or "L")."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"reference folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    names = [str(p.relative_to(root)) for p in files]

    def load_images() -> np.ndarray:
        from PIL import Image

        arrays = []
        for file in files:
            with Image.open(file) as image:
                arrays.append(_pil_to_array(image, mode))
        return _stack(arrays, names, str(root))

    def digest() -> str:
        h = new_hasher()
        h.update(f"folder mode={mode}".encode())
        for file, name in zip(files, names):
            h.update(name.encode() + b"\0")
            file_digest(file, h)
        return h.hexdigest()

    return Reference(source=str(root), load_images=load_images, digest=digest)


def from_hf_dataset(
    dataset, column: str = "image", split: str | None = None, mode: str = "RGB", limit: int | None = None
) -> Reference:
    """A Hugging Face ``datasets`` dataset (object, or hub name loaded with ``split``), image column ``column``."""
    if isinstance(dataset, str):
        import datasets

        name = f"{dataset}[{split}]"
        dataset = datasets.load_dataset(dataset, split=split)
    else:
        name = f"dataset {getattr(dataset, '_fingerprint', '?')}"
    if column not in dataset.column_names:
        raise ValueError(f"{name} has no column {column!r} (has {dataset.column_names})")
    rows = range(len(dataset) if limit is None else min(limit, len(dataset)))
    holder: dict[str, np.ndarray] = {}

    def load_images() -> np.ndarray:
        if "images" not in holder:
            arrays = [_pil_to_array(dataset[i][column], mode) for i in rows]
            holder["images"] = _stack(arrays, [f"row {i}" for i in rows], name)
        return holder["images"]

    def digest() -> str:  # decoded pixels: a content hash independent of file encodings
        h = new_hasher()
        h.update(f"hf column={column} mode={mode}".encode())
        update_with_array(h, load_images())
        return h.hexdigest()

    return Reference(source=f"{name}:{column}", load_images=load_images, digest=digest)


def load_reference(path: str | os.PathLike, stats_extractor: str = INCEPTION_NAME) -> Reference:
    """A reference from a path: an ``.npz`` with ``arr_0`` (ADM batch), an ``.npz`` of ``mu, sigma``, or a folder."""
    path = Path(path)
    if path.is_dir():
        return from_folder(path)
    if not path.exists():
        raise ValueError(f"reference {path}: no such file or folder")
    if path.suffix != ".npz" or not path.is_file():
        raise ValueError(f"reference {path} is neither an .npz file nor an image folder")
    try:
        with np.load(path) as npz:
            has_images = "arr_0" in npz.files
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"reference {path} is not a readable .npz ({type(e).__name__}: {e})") from None
    return from_adm_npz(path, stats_extractor) if has_images else from_stats_npz(path, stats_extractor)


def as_reference(reference) -> Reference:
    """A :class:`Reference` as is; a uint8 image array via :func:`from_array`; a path via :func:`load_reference`."""
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, np.ndarray):
        return from_array(reference)
    return load_reference(reference)
