"""LGG figures for ``make data-stats``: the numbers the LGG phantom is calibrated against.

Tumour area per tumour slice and volume per patient (px at 256x256), the share of slices with tumour
per patient, the tumour's FLAIR contrast (median FLAIR inside / median FLAIR of the head outside it),
its solidity (area / convex hull area), the head's share of the frame, the FLAIR level of each
patient's head, and the patients whose sequence is a copy of FLAIR or has a grey background.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from pipeline.data.stats import DataStats, pct
from pipeline.datasets.base import DatasetSpec

LGG_GRID = (256, 256)  # areas are given at the real slice size
MIN_SHAPE_PX = 30  # smaller tumour cross-sections are too few pixels for contrast or shape


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


def describe(spec: DatasetSpec, root: Path) -> DataStats:
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
