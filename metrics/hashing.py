"""Content digests for cache keys (never a name alone: see ``metrics/reference.py``)."""

from __future__ import annotations

import hashlib
import os

import numpy as np

__all__ = ["new_hasher", "update_with_array", "file_digest", "array_digest"]

_CHUNK = 1 << 22  # 4 MiB


def new_hasher():
    return hashlib.sha256()


def update_with_array(h, array: np.ndarray) -> None:
    """Feed dtype, shape and the C-order bytes of ``array`` to hasher ``h`` (chunked, no full copy)."""
    array = np.asarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):
        h.update(memoryview(flat[start : start + _CHUNK]))


def file_digest(path: str | os.PathLike, h=None) -> str:
    """sha256 hex digest of a file's bytes (optionally fed into an existing hasher)."""
    h = new_hasher() if h is None else h
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def array_digest(array: np.ndarray) -> str:
    """sha256 hex digest of an array's dtype, shape and bytes."""
    h = new_hasher()
    update_with_array(h, array)
    return h.hexdigest()
