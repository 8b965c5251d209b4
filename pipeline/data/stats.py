"""What a dataset folder looks like in numbers, real or phantom, so the two can be set side by side.

:func:`dataset_stats` reads a ``DATA_DIR`` through the dataset's own readers (the spec is handed in)
and returns named rows of figures; :func:`format_table` prints one column per folder. The phantoms
are calibrated against these rows on the real development folders.

- LGG: tumour area per tumour slice and volume per patient (px at 256x256), the share of slices with
  tumour per patient, the tumour's FLAIR contrast (median FLAIR inside / median FLAIR of the head
  outside it), its solidity (area / convex hull area), the head's share of the frame, the FLAIR level
  of each patient's head, and the patients whose sequence is a copy of FLAIR or has a grey background.
- Ultrasound Nerve: from ``train_masks.csv`` (every subject, with or without images) the share of
  empty frames overall and per subject, nerve area, box and centre (px at 420x580); from the frames
  that exist, the nerve's mean intensity against a ring around it.
- UW-Madison: from ``train.csv`` alone, the labelled share of slices and the mask areas per class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.data.images import tiff_shape
from pipeline.errors import DataError
from pipeline.rle import rle_decode_batch

log = logging.getLogger(__name__)

LGG_GRID = (256, 256)  # areas are given at the real slice size
NERVE_GRID = (420, 580)  # and at the real frame size
MIN_SHAPE_PX = 30  # smaller tumour cross-sections are too few pixels for contrast or shape
RING_PX = (5, 20)  # the ring around a nerve: from 5 to 20 px outside its outline
DECODE_CHUNK = 256  # nerve masks decoded at a time (420x580 bytes each)


class Describer(Protocol):
    """The part of a dataset spec (:mod:`pipeline.datasets`) that describes a folder."""

    def describe_folder(self, root: Path) -> DataStats: ...


class Reader(Protocol):
    """The parts of a dataset spec (pipeline.datasets) the statistics read through."""

    @property
    def name(self) -> str: ...

    @property
    def rle_order(self) -> str: ...

    def load_split(self, root: Path, split: str = "train") -> pd.DataFrame: ...

    def read_volume(self, rows: pd.DataFrame, with_masks: bool | None = None) -> Any: ...

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Stat:
    """One row: a label, its figures and how they print (``int``, ``float`` or ``share``)."""

    label: str
    values: tuple[float, ...]
    kind: str = "int"
    sep: str = " / "

    def text(self) -> str:
        def one(v: float) -> str:
            if v is None or not np.isfinite(v):
                return "-"
            return {"int": f"{v:,.0f}", "float": f"{v:.2f}", "share": f"{v:.1%}"}[self.kind]

        return self.sep.join(one(v) for v in self.values)


@dataclass
class DataStats:
    """The statistics of one folder: its dataset, its root and the rows in print order."""

    dataset: str
    root: Path
    rows: list[Stat] = field(default_factory=list)

    def add(self, label: str, values: Sequence[float], kind: str = "int", sep: str = " / ") -> None:
        self.rows.append(Stat(label, tuple(float(v) for v in values), kind, sep))

    def value(self, label: str) -> tuple[float, ...]:
        """The figures of the row whose label starts with ``label``."""
        for row in self.rows:
            if row.label.startswith(label):
                return row.values
        raise KeyError(f"no row '{label}' in the {self.dataset} statistics of {self.root}")


def pct(values: Sequence[float] | np.ndarray, qs: Sequence[float]) -> list[float]:
    """Percentiles ``qs`` (0-100) of ``values``; NaN for each when there are none."""
    array = np.asarray(values, dtype=np.float64)
    return np.percentile(array, qs).tolist() if array.size else [np.nan] * len(qs)


# --------------------------------------------------------------------------- Ultrasound Nerve


def nerve_labels(root: Path) -> pd.DataFrame:
    """``train_masks.csv`` as (subject, img, pixels, id) strings; images are not needed."""
    path = Path(root) / "train_masks.csv"
    if not path.is_file():
        raise DataError(f"{path} not found: the nerve statistics read the masks from it")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"subject", "img", "pixels"} - set(table.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)} (expected subject,img,pixels)")
    table["pixels"] = table["pixels"].str.strip()
    table["id"] = table["subject"].str.strip() + "_" + table["img"].str.strip()
    return table


def frame_shape(root: Path) -> tuple[int, int]:
    """The frame size of a nerve folder: that of its first train image, else the real 420x580."""
    first = next(
        (p for p in sorted((Path(root) / "train").glob("*.tif")) if not p.stem.endswith("_mask")), None
    )
    if first is None:
        return NERVE_GRID
    height, width = tiff_shape(first)[:2]
    return int(height), int(width)


def mask_geometry(masks: np.ndarray) -> np.ndarray:
    """(N, 5) float: area, box height, box width, centre row, centre column of (N, H, W) masks."""
    out = np.zeros((len(masks), 5))
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        r, c = np.nonzero(mask)
        out[i] = (len(r), rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1, r.mean(), c.mean())
    return out


def ring_contrast(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The nerve's mean / the mean of a ring around it, and (nerve - ring) / the ring's std."""
    m = mask.astype(np.uint8)
    near = cv2.dilate(m, np.ones((2 * RING_PX[0] + 1,) * 2, np.uint8)) > 0
    far = cv2.dilate(m, np.ones((2 * RING_PX[1] + 1,) * 2, np.uint8)) > 0
    inside, ring = image[m > 0].astype(np.float64), image[far & ~near].astype(np.float64)
    return inside.mean() / max(ring.mean(), 1.0), (inside.mean() - ring.mean()) / max(ring.std(), 1.0)


def nerve_stats(spec: Reader, root: Path) -> DataStats:
    """The nerve rows: empty share (overall, per subject), size, box, centre; contrast where frames exist."""
    table = nerve_labels(root)
    shape = frame_shape(root)
    scale_r, scale_c = NERVE_GRID[0] / shape[0], NERVE_GRID[1] / shape[1]
    empty = table["pixels"] == ""
    per_subject = empty.groupby(table["subject"]).mean()
    filled = table[~empty]
    geometry, contrast, means = [], [], []
    for start in tqdm(range(0, len(filled), DECODE_CHUNK), desc="masks", leave=False):
        part = filled.iloc[start : start + DECODE_CHUNK]
        masks = rle_decode_batch(part["pixels"], shape, spec.rle_order, where="train_masks.csv")
        geometry.append(mask_geometry(masks))
        for frame_id, mask in zip(part["id"], masks):
            path = Path(root) / "train" / f"{frame_id}.tif"
            if path.is_file():
                image = spec.read_image(path, *shape)
                contrast.append(ring_contrast(image, mask))
                means.append(image.mean())
    g = np.concatenate(geometry) if geometry else np.zeros((0, 5))
    c = np.asarray(contrast).reshape(-1, 2)
    stats = DataStats("nerve", Path(root))
    stats.add("subjects / frames / frames with a nerve", [len(per_subject), len(table), len(filled)])
    stats.add("empty frames overall", [empty.mean() if len(table) else np.nan], "share")
    stats.add("empty frames per subject, min / p50 / max", pct(per_subject, (0, 50, 100)), "share")
    stats.add("nerve area (px at 420x580), p5 / p50 / p95", pct(g[:, 0] * scale_r * scale_c, (5, 50, 95)))
    stats.add(
        "nerve box height x width (px), p50",
        [*pct(g[:, 1] * scale_r, [50]), *pct(g[:, 2] * scale_c, [50])],
        sep=" x ",
    )
    stats.add("nerve centre row, p10 / p50 / p90", pct(g[:, 3] * scale_r, (10, 50, 90)))
    stats.add("nerve centre column, p10 / p50 / p90", pct(g[:, 4] * scale_c, (10, 50, 90)))
    stats.add("frames with a nerve and an image", [len(c)])
    stats.add("nerve / ring mean intensity, p10 / p50 / p90", pct(c[:, 0], (10, 50, 90)), "float")
    stats.add("(nerve - ring) / ring std, p10 / p50 / p90", pct(c[:, 1], (10, 50, 90)), "float")
    stats.add("mean intensity of those frames, p50", pct(means, [50]))
    return stats


# --------------------------------------------------------------------------- entry and printing


def dataset_stats(spec: Describer, root: Path | str) -> DataStats:
    """The statistics of the dataset folder ``root``: the figures its dataset plug-in ``spec`` gives."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (set DATA_DIR or pass --data-dir)")
    return spec.describe_folder(root)


def format_table(tables: Sequence[DataStats], names: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per statistic, one column per folder (headed by ``names``)."""
    names = list(names) if names else [str(t.root) for t in tables]
    labels = list(dict.fromkeys(row.label for t in tables for row in t.rows))
    cells = [[next((r.text() for r in t.rows if r.label == label), "") for t in tables] for label in labels]
    width = max(len(x) for x in [*labels, "statistic"])
    widths = [max(len(x) for x in [name, *(row[i] for row in cells)]) for i, name in enumerate(names)]
    lines = ["  ".join(["statistic".ljust(width), *(n.rjust(w) for n, w in zip(names, widths))])]
    lines.append("  ".join("-" * w for w in [width, *widths]))
    for label, row in zip(labels, cells):
        lines.append("  ".join([label.ljust(width), *(c.rjust(w) for c, w in zip(row, widths))]))
    return "\n".join(lines)
