"""Ultrasound Nerve figures for ``make data-stats``: the numbers the nerve phantom is calibrated against.

From ``train_masks.csv`` (every subject, with or without images) the share of empty frames overall and
per subject, nerve area, box and centre (px at 420x580); from the frames that exist, the nerve's mean
intensity against a ring around it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.data.images import tiff_shape
from pipeline.data.stats import DataStats, Reader, mask_geometry, pct, ring_contrast
from pipeline.rle import rle_decode_batch

NERVE_GRID = (420, 580)  # areas are given at the real frame size
DECODE_CHUNK = 256  # nerve masks decoded at a time (420x580 bytes each)


def frame_shape(root: Path) -> tuple[int, int]:
    """The frame size of a nerve folder: that of its first train image, else the real 420x580."""
    first = next(
        (p for p in sorted((Path(root) / "train").glob("*.tif")) if not p.stem.endswith("_mask")), None
    )
    if first is None:
        return NERVE_GRID
    height, width = tiff_shape(first)[:2]
    return int(height), int(width)


def describe(spec: Reader, root: Path, table: pd.DataFrame) -> DataStats:
    """The nerve rows: empty share (overall, per subject), size, box, centre; contrast where frames exist.
    ``table``: ``train_masks.csv`` as the plug-in reads it (``pixels`` indexed by ``<subject>_<img>``)."""
    shape = frame_shape(root)
    scale_r, scale_c = NERVE_GRID[0] / shape[0], NERVE_GRID[1] / shape[1]
    empty = table["pixels"] == ""
    per_subject = empty.groupby(table.index.str.split("_").str[0]).mean()
    filled = table[~empty]
    geometry, contrast, means = [], [], []
    for start in tqdm(range(0, len(filled), DECODE_CHUNK), desc="masks", leave=False):
        part = filled.iloc[start : start + DECODE_CHUNK]
        masks = rle_decode_batch(part["pixels"], shape, spec.rle_order, where="train_masks.csv")
        geometry.append(mask_geometry(masks))
        for frame_id, mask in zip(part.index, masks):
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
