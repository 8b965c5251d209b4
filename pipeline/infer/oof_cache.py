"""The decoded cache of out-of-fold files: each ``oof/<volume_id>.npz`` decoded once, cut to its box.

``$CACHE_DIR/oof/<path under RUNS_DIR>.npy`` holds the (S, H, W) box of the file's non-zero
probabilities only (memory-mapped by tuning); a ``.json`` beside it names its source (absolute
path, size, mtime), its shape, box and slice ids, so a cache made from another file (another
``RUNS_DIR`` sharing the ``CACHE_DIR``, a rewritten OOF) is decoded again, never served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.infer.masks import foreground_box
from pipeline.io import load_npy, load_npz, write_text, write_with
from pipeline.paths import cache_dir, runs_dir

Box = tuple[slice, slice, slice]  # (S, H, W) slices of a volume


@dataclass(frozen=True)
class OOFEntry:
    """One decoded out-of-fold file: its slice ids, its (S, classes, H, W) shape, and the (S, H, W)
    box holding its non-zero probabilities (None: all zero); the cache holds that box only."""

    ids: list[str]
    shape: tuple[int, int, int, int]
    box: Box | None
    cache: Path

    def crop(self) -> np.ndarray:
        """The box's (s, classes, h, w) uint8 probabilities, memory-mapped."""
        return load_npy(self.cache, mmap_mode="r")  # thread-safe: tuning reads volumes over threads

    def cut(self, box: Box) -> np.ndarray:
        """A C-contiguous (s, classes, h, w) copy of the probabilities in ``box`` (zeros outside this
        file's own box, which must lie inside ``box``)."""
        n_c = self.shape[1]
        out = np.zeros(
            (box[0].stop - box[0].start, n_c, box[1].stop - box[1].start, box[2].stop - box[2].start),
            np.uint8,
        )
        if self.box is not None:
            at = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(self.box, box))
            out[at[0], :, at[1], at[2]] = self.crop()
        return out

    def full(self) -> np.ndarray:
        """The whole (S, classes, H, W) uint8 probabilities."""
        n_s, _, n_h, n_w = self.shape
        return self.cut((slice(0, n_s), slice(0, n_h), slice(0, n_w)))


def volume_box(mask: np.ndarray) -> Box | None:
    """The (S, H, W) box of the non-zero voxels of an (S, classes, H, W) array; None when all zero."""
    return foreground_box(np.asarray(mask).any(axis=1))


def union_box(boxes: list[Box | None], shape: tuple[int, ...]) -> Box:
    """The smallest box holding every box given (one voxel at the origin when none is)."""
    given = [b for b in boxes if b is not None]
    if not given:
        return (slice(0, 1), slice(0, 1), slice(0, 1))
    s, h, w = (slice(min(b[i].start for b in given), max(b[i].stop for b in given)) for i in range(3))
    return s, h, w


def _cache_path(npz: Path) -> Path:
    try:
        rel = npz.resolve().relative_to(runs_dir().resolve())
    except ValueError:
        rel = Path(hashlib.sha1(str(npz.resolve()).encode()).hexdigest()[:12]) / npz.name
    return cache_dir() / "oof" / rel.with_suffix(".npy")


def _source(path: Path) -> dict:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def oof_entry(path: Path) -> OOFEntry:
    """The decoded cache of one OOF file, decoded (cut to its non-zero box) when absent or stale.

    The cache sits at ``$CACHE_DIR/oof/<path under RUNS_DIR>.npy`` with a ``.json`` beside it that
    names its source (absolute path, size, mtime): a cache made from another file (another
    ``RUNS_DIR`` sharing the ``CACHE_DIR``, a rewritten OOF) is never served.
    """
    cache = _cache_path(path)
    meta_path = cache.with_suffix(".json")
    try:
        source = _source(path)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if any(meta.get(k) != v for k, v in source.items()) or (meta.get("box") and not cache.is_file()):
            meta = _decode(path, cache, meta_path, source)
    except (KeyError, OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: unreadable OOF file ({exc}); rerun the member's training or OOF") from None
    box: Box | None = None
    if meta["box"] is not None:
        (s0, s1), (h0, h1), (w0, w1) = meta["box"]
        box = (slice(s0, s1), slice(h0, h1), slice(w0, w1))
    return OOFEntry(list(meta["ids"]), tuple(meta["shape"]), box, cache)


def _decode(path: Path, cache: Path, meta_path: Path, source: dict) -> dict:
    arrays = load_npz(path, ("ids", "probs"))
    ids, probs = [str(i) for i in arrays["ids"]], arrays["probs"]
    if probs.dtype != np.uint8 or probs.ndim != 4:
        raise DataError(f"{path}: 'probs' must be uint8 (S, classes, H, W), got {probs.dtype} {probs.shape}")
    box = volume_box(probs)
    if box is not None:
        write_with(cache, lambda p: np.save(p, np.ascontiguousarray(probs[box[0], :, box[1], box[2]])))
    else:
        cache.unlink(missing_ok=True)
    meta = {
        **source,
        "shape": list(probs.shape),
        "box": None if box is None else [[b.start, b.stop] for b in box],
        "ids": ids,
    }
    write_text(meta_path, json.dumps(meta))
    return meta


def read_oof_volume(path: Path) -> tuple[np.ndarray, list[str]]:
    """(probs uint8 (S, classes, H, W), ids) of one OOF file, from its decoded cache."""
    entry = oof_entry(path)
    return entry.full(), entry.ids
