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
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage
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


class Reader(Protocol):
    """The parts of a dataset spec (pipeline.datasets) the statistics read through."""

    name: str
    rle_order: str

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


def pct(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Percentiles ``qs`` (0-100) of ``values``; NaN for each when there are none."""
    values = np.asarray(values, dtype=np.float64)
    return np.percentile(values, qs).tolist() if values.size else [np.nan] * len(qs)


# --------------------------------------------------------------------------- LGG


def head_mask(flair: np.ndarray) -> np.ndarray:
    """(H, W) bool: the head of one slice, from its FLAIR channel (the one never replaced).

    Pixels of the lightly blurred slice above a tenth of its 99th percentile (at least 8), holes
    filled, the largest component kept: robust to the dark frames and grey skull of real scans.
    """
    smooth = cv2.GaussianBlur(flair.astype(np.float32), (0, 0), 2.0)
    level = max(8.0, 0.1 * float(np.percentile(smooth, 99)))
    fg = ndimage.binary_fill_holes(smooth > level)
    labels, n = ndimage.label(fg)
    if n <= 1:
        return fg
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def solidity(mask: np.ndarray) -> float:
    """Area / area of the convex hull of every mask pixel (both counted in pixels: at most 1)."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(hull, [cv2.convexHull(points)], 1)
    return float(np.count_nonzero(mask)) / max(int(np.count_nonzero(hull | mask)), 1)


def _lgg_slice(image: np.ndarray, mask: np.ndarray, head: np.ndarray, scale: float, out: dict) -> None:
    """Add one (3, H, W) slice's figures to ``out`` (lists keyed by figure); ``head`` is its head mask."""
    out["head_share"].append(head.mean())
    if head.any():
        rows, cols = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
        out["head_box"].append((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / head.size)
    area = int(np.count_nonzero(mask))
    if not area:
        return
    out["area"].append(area * scale)
    if area * scale >= MIN_SHAPE_PX:
        flair, outside = image[1], head & ~ndimage.binary_dilation(mask, iterations=2)
        if outside.any():
            out["contrast"].append(np.median(flair[mask]) / max(float(np.median(flair[outside])), 1.0))
        out["solidity"].append(solidity(mask))


def _lgg_patient(volume: Any, out: dict) -> None:
    """Add one patient's figures (its slices, volume, tumour share, FLAIR level, replaced sequences)."""
    image, mask = np.asarray(volume.image), np.asarray(volume.mask)[:, 0] > 0
    h, w = image.shape[-2:]
    scale = LGG_GRID[0] * LGG_GRID[1] / (h * w)
    heads = np.stack([head_mask(flair) for flair in image[:, 1]])
    for s in range(len(image)):
        _lgg_slice(image[s], mask[s], heads[s], scale, out)
    out["volume"].append(mask.sum() * scale)
    out["share"].append(mask.any(axis=(1, 2)).mean())
    out["flair_level"].append(float(np.median(image[:, 1][heads])) if heads.any() else np.nan)
    out["copied"].append(any(np.array_equal(image[:, c], image[:, 1]) for c in (0, 2)))
    corners = image[:, :, :8, :8].reshape(len(image), 3, -1)
    out["grey"].append(bool((np.median(corners, axis=(0, 2)) > 20).any()))


LGG_ROWS = (  # label, figure, percentiles, kind
    ("tumour area per tumour slice (px at 256x256), p5 / p50 / p95", "area", (5, 50, 95), "int"),
    ("tumour volume per patient (px), p5 / p50 / p95", "volume", (5, 50, 95), "int"),
    ("share of slices with tumour per patient, p10 / p50 / p90", "share", (10, 50, 90), "float"),
    ("FLAIR tumour / rest of head (medians), p10 / p50 / p90", "contrast", (10, 50, 90), "float"),
    ("tumour solidity (area / convex hull), p10 / p50 / p90", "solidity", (10, 50, 90), "float"),
    ("head share of the frame per slice, p10 / p50 / p90", "head_share", (10, 50, 90), "float"),
    ("head box share of the frame per slice, p10 / p50 / p90", "head_box", (10, 50, 90), "float"),
    ("median FLAIR of the head per patient, p10 / p50 / p90", "flair_level", (10, 50, 90), "int"),
)


def lgg_stats(spec: Reader, root: Path) -> DataStats:
    """The LGG rows: tumour size, extent, contrast and shape, head size, per-patient intensity."""
    catalog = spec.load_split(root, "train")
    out: dict[str, list] = defaultdict(list)
    volumes = catalog.groupby("volume_id", sort=False)
    for _, rows in tqdm(volumes, total=volumes.ngroups, desc="patients", unit="patient", leave=False):
        _lgg_patient(spec.read_volume(rows, with_masks=True), out)
    stats = DataStats("lgg", Path(root))
    n = len(out["volume"])
    stats.add("patients / slices / tumour slices", [n, len(catalog), len(out["area"])])
    for label, key, qs, kind in LGG_ROWS:
        stats.add(label, pct(out[key], qs), kind)
    stats.add("patients with a sequence copied from FLAIR", [sum(out["copied"]) / max(n, 1)], "share")
    stats.add("patients with a grey background in a sequence", [sum(out["grey"]) / max(n, 1)], "share")
    return stats


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
    return tuple(tiff_shape(first)[:2]) if first is not None else NERVE_GRID


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


# --------------------------------------------------------------------------- UW-Madison


def uwmgi_stats(spec: Reader, root: Path) -> DataStats:
    """The cheap UW-Madison rows, from ``train.csv`` alone: labelled share and mask areas per class."""
    path = Path(root) / "train.csv"
    if not path.is_file():
        raise DataError(f"{path} not found: the UW-Madison statistics read the labels from it")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table["area"] = [sum(map(int, s.split()[1::2])) for s in table["segmentation"]]
    stats = DataStats("uwmgi", Path(root))
    labelled = table.groupby("id")["area"].max() > 0
    stats.add("slices", [len(labelled)])
    stats.add("slices with any label", [labelled.mean()], "share")
    for name, rows in table.groupby("class", sort=True):
        areas = rows["area"][rows["area"] > 0]
        stats.add(f"{name}: share of slices labelled", [(rows["area"] > 0).mean()], "share")
        stats.add(f"{name}: mask area (px), p5 / p50 / p95", pct(areas, (5, 50, 95)))
    return stats


# --------------------------------------------------------------------------- dispatch and printing

BY_DATASET: dict[str, Callable[[Reader, Path], DataStats]] = {
    "lgg": lgg_stats,
    "nerve": nerve_stats,
    "uwmgi": uwmgi_stats,
}


def dataset_stats(spec: Reader, root: Path | str) -> DataStats:
    """The statistics of the dataset folder ``root``, read through ``spec`` (a dataset plug-in)."""
    if spec.name not in BY_DATASET:
        raise DataError(f"no statistics for dataset '{spec.name}'; available: {', '.join(BY_DATASET)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (set DATA_DIR or pass --data-dir)")
    return BY_DATASET[spec.name](spec, root)


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
