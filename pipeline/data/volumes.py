"""Per-day volumes: decoded once, cached as ``.npy``, memory-mapped for training.

A day-volume is every slice of ``case{N}_day{D}`` in slice order: image uint16 (S, H, W) and,
when labels exist, masks uint8 (S, 3, H, W) in ``CLASSES`` order. Training reads the cache
(``$CACHE_DIR/<dataset>/<split>/<case_day>.{image,mask}.npy``) and never decodes a PNG twice;
inference reads a day straight from the PNGs (:func:`read_volume`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import CLASSES
from pipeline.data.catalog import DataError, days, read_slice
from pipeline.io import write_json, write_with
from pipeline.paths import cache_dir
from pipeline.rle import rle_decode

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class Volume:
    """One day-volume. ``mask`` is None when the split has no labels."""

    case_day: str
    ids: list[str]
    image: np.ndarray  # (S, H, W) uint16
    mask: np.ndarray | None  # (S, 3, H, W) uint8
    spacing: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    def __len__(self) -> int:
        return int(self.image.shape[0])


def _check_day(rows: pd.DataFrame) -> None:
    sizes = rows[["width", "height"]].drop_duplicates()
    if len(sizes) != 1:
        raise DataError(
            f"{rows['case_day'].iloc[0]}: slices of one day-volume have different sizes "
            f"{sizes.to_dict('records')}; every slice of a day must share its size"
        )


def decode_masks(rows: pd.DataFrame, source: str = "train.csv") -> np.ndarray:
    """(S, 3, H, W) uint8 masks of one day from the per-class RLE columns of the catalog."""
    height, width = int(rows["height"].iloc[0]), int(rows["width"].iloc[0])
    masks = np.zeros((len(rows), len(CLASSES), height, width), dtype=np.uint8)
    for s, row in enumerate(rows.itertuples(index=False)):
        for c, name in enumerate(CLASSES):
            rle = getattr(row, name)
            if rle:
                masks[s, c] = rle_decode(rle, (height, width), where=f"{source} ({row.id}, {name})")
    return masks


def read_volume(rows: pd.DataFrame, with_masks: bool | None = None, source: str = "train.csv") -> Volume:
    """Read one day straight from its PNGs (rows: that day's catalog rows, any order)."""
    rows = rows.sort_values("slice", kind="stable")
    _check_day(rows)
    width, height = int(rows["width"].iloc[0]), int(rows["height"].iloc[0])
    image = np.stack([read_slice(p, width, height) for p in rows["path"]])
    has_labels = all(name in rows.columns for name in CLASSES)
    mask = decode_masks(rows, source) if (has_labels if with_masks is None else with_masks) else None
    spacing = (float(rows["py"].iloc[0]), float(rows["px"].iloc[0]))
    return Volume(str(rows["case_day"].iloc[0]), list(rows["id"]), image, mask, spacing)


def dataset_key(root: Path) -> str:
    """Cache folder name of a dataset: its folder name plus a hash of its absolute path."""
    root = Path(root).resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return f"{root.name}-{digest}"


class VolumeStore:
    """Cached, memory-mapped day-volumes of one split, built on first use.

    A day's cache is rebuilt when its slice ids, its label source (size and mtime of the
    labels file) or the cache version change.
    """

    def __init__(self, root: Path, catalog: pd.DataFrame, split: str = "train", cache_root: Path | None = None):
        self.root = Path(root)
        self.split = split
        self.catalog = catalog
        self.dir = (cache_root or cache_dir()) / dataset_key(self.root) / split
        self.has_labels = all(name in catalog.columns for name in CLASSES)
        self._groups = {k: g for k, g in catalog.groupby("case_day", sort=False)}
        labels = self.root / "train.csv"
        stat = labels.stat() if labels.is_file() and self.has_labels else None
        self._source = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} if stat else None

    @property
    def days(self) -> list[str]:
        return days(self.catalog)

    def _meta(self, case_day: str) -> dict:
        return {
            "version": CACHE_VERSION,
            "ids": list(self._groups[case_day].sort_values("slice")["id"]),
            "labels": self._source,
        }

    def _paths(self, case_day: str) -> tuple[Path, Path, Path]:
        return (
            self.dir / f"{case_day}.image.npy",
            self.dir / f"{case_day}.mask.npy",
            self.dir / f"{case_day}.json",
        )

    def is_cached(self, case_day: str) -> bool:
        image_path, mask_path, meta_path = self._paths(case_day)
        if not (image_path.is_file() and meta_path.is_file()):
            return False
        if self.has_labels and not mask_path.is_file():
            return False
        try:
            return json.loads(meta_path.read_text()) == self._meta(case_day)
        except (OSError, ValueError):
            return False

    def _write(self, case_day: str) -> None:
        image_path, mask_path, meta_path = self._paths(case_day)
        volume = read_volume(self._groups[case_day], with_masks=self.has_labels, source=str(self.root / "train.csv"))
        write_with(image_path, lambda p: np.save(p, volume.image))
        if volume.mask is not None:
            write_with(mask_path, lambda p: np.save(p, volume.mask))
        write_json(meta_path, self._meta(case_day))

    def build(self, progress: bool = True) -> None:
        """Decode every day not yet cached (a progress bar over days)."""
        todo = [d for d in self.days if not self.is_cached(d)]
        if not todo:
            return
        log.info("caching %d day-volumes of %s/%s into %s", len(todo), self.root, self.split, self.dir)
        for case_day in tqdm(todo, desc=f"cache {self.split}", unit="day", disable=not progress):
            self._write(case_day)

    def __getitem__(self, case_day: str) -> Volume:
        if case_day not in self._groups:
            raise KeyError(f"{case_day} is not a day-volume of {self.root}/{self.split}")
        if not self.is_cached(case_day):
            self._write(case_day)
        image_path, mask_path, _ = self._paths(case_day)
        rows = self._groups[case_day].sort_values("slice")
        image = np.load(image_path, mmap_mode="r")
        mask = np.load(mask_path, mmap_mode="r") if self.has_labels else None
        spacing = (float(rows["py"].iloc[0]), float(rows["px"].iloc[0]))
        return Volume(case_day, list(rows["id"]), image, mask, spacing)
