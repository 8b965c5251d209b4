"""Volumes: decoded once, cached as ``.npy``, memory-mapped for training.

A volume is every image of one ``volume_id`` of a catalog in slice order (a UW-Madison day, an LGG
patient, a nerve subject's frames): image (S, H, W), or (S, C, H, W) for multi-channel datasets,
and, when labels exist, masks uint8 (S, classes, H, W). Reading the files is the dataset's job
(:meth:`pipeline.datasets.base.DatasetSpec.read_volume`); training reads the cache
(``$CACHE_DIR/<dataset folder>/<split>/<volume_id>.{image,mask}.npy``) and never decodes an image
twice; inference reads a volume straight from its files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.io import load_npy, write_json, write_with
from pipeline.paths import cache_dir
from pipeline.runtime import available_cores

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: any dataset; multi-channel images (S, C, H, W)


def volume_ids(catalog: pd.DataFrame) -> list[str]:
    """Volume keys in catalog order."""
    return list(dict.fromkeys(catalog["volume_id"]))


def gray(image: np.ndarray) -> np.ndarray:
    """(S, H, W) of a volume image: itself, or the mean of its channels when it is (S, C, H, W)."""
    image = np.asarray(image)
    return image if image.ndim == 3 else image.mean(axis=1, dtype=np.float32)


@dataclass
class Volume:
    """One volume. ``mask`` is None when the split has no labels."""

    volume_id: str
    ids: list[str]
    image: np.ndarray  # (S, H, W) or (S, C, H, W)
    mask: np.ndarray | None  # (S, classes, H, W) uint8
    spacing: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def gray(self) -> np.ndarray:
        """(S, H, W): the image, channels averaged (detector, boxes, figures)."""
        return gray(self.image)

    def __len__(self) -> int:
        return int(self.image.shape[0])


def dataset_key(root: Path) -> str:
    """Cache folder name of a dataset: its folder name plus a hash of its absolute path."""
    root = Path(root).resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return f"{root.name}-{digest}"


class VolumeStore:
    """Cached, memory-mapped volumes of one split of a dataset, built on first use.

    ``spec`` is the dataset (:class:`pipeline.datasets.base.DatasetSpec`): it reads the files.
    A volume's cache is rebuilt when its ids, its label source (size and mtime of the dataset's
    labels file) or the cache version change.
    """

    def __init__(
        self, root: Path, catalog: pd.DataFrame, split: str, spec: Any, cache_root: Path | None = None
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.catalog = catalog
        self.spec = spec
        self.dir = (cache_root or cache_dir()) / dataset_key(self.root) / split
        self.has_labels = bool(spec.has_labels(catalog))
        self._groups = {k: g for k, g in catalog.groupby("volume_id", sort=False)}
        labels = self.root / spec.labels_file if spec.labels_file else None
        stat = labels.stat() if labels is not None and labels.is_file() and self.has_labels else None
        self._source = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} if stat else None

    @property
    def volume_ids(self) -> list[str]:
        """The volume ids of the split, in catalog order."""
        return volume_ids(self.catalog)

    def _meta(self, volume_id: str) -> dict:
        return {
            "version": CACHE_VERSION,
            "ids": list(self._groups[volume_id].sort_values("slice")["id"]),
            "labels": self._source,
        }

    def _paths(self, volume_id: str) -> tuple[Path, Path, Path]:
        return (
            self.dir / f"{volume_id}.image.npy",
            self.dir / f"{volume_id}.mask.npy",
            self.dir / f"{volume_id}.json",
        )

    def is_cached(self, volume_id: str) -> bool:
        image_path, mask_path, meta_path = self._paths(volume_id)
        if not (image_path.is_file() and meta_path.is_file()):
            return False
        if self.has_labels and not mask_path.is_file():
            return False
        try:
            return json.loads(meta_path.read_text()) == self._meta(volume_id)
        except (OSError, ValueError):
            return False

    def _write(self, volume_id: str) -> None:
        image_path, mask_path, meta_path = self._paths(volume_id)
        volume = self.spec.read_volume(self._groups[volume_id], with_masks=self.has_labels)
        write_with(image_path, lambda p: np.save(p, volume.image))
        if volume.mask is not None:
            write_with(mask_path, lambda p: np.save(p, volume.mask))
        write_json(meta_path, self._meta(volume_id))

    def build(self, progress: bool = True, workers: int | None = None) -> None:
        """Decode every volume not yet cached, ``workers`` volumes at a time (default: one per core).

        Threads suffice: PNG/TIFF decoding and ``np.save`` release the GIL (the build takes half the
        time on 2 cores), and each thread holds one volume.
        """
        todo = [v for v in self.volume_ids if not self.is_cached(v)]
        if not todo:
            return
        workers = max(1, min(workers or available_cores(), len(todo)))
        log.info("caching %d volumes of %s/%s into %s", len(todo), self.root, self.split, self.dir)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = pool.map(self._write, todo)
            for _ in tqdm(
                done, total=len(todo), desc=f"cache {self.split}", unit="vol", disable=not progress
            ):
                pass

    def __getitem__(self, volume_id: str) -> Volume:
        if volume_id not in self._groups:
            raise KeyError(f"{volume_id} is not a volume of {self.root}/{self.split}")
        if not self.is_cached(volume_id):
            self._write(volume_id)
        image_path, mask_path, _ = self._paths(volume_id)
        rows = self._groups[volume_id].sort_values("slice")
        image = load_npy(image_path, mmap_mode="r")  # thread-safe: tuning maps volumes over threads
        mask = load_npy(mask_path, mmap_mode="r") if self.has_labels else None
        spacing = (float(rows["py"].iloc[0]), float(rows["px"].iloc[0]))
        return Volume(volume_id, list(rows["id"]), image, mask, spacing)
