"""A hand-written Kaggle-layout writer for tests that need a few exact slices."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.datasets.uwmgi_files import CLASSES, make_id, slice_filename
from pipeline.rle import rle_encode


def write_day(
    root: Path, case: int, day: int, n_slices: int, shape=(24, 32), seed=0, split="train"
) -> list[dict]:
    """Write one day-volume of random images with blob masks; return its label rows."""
    rng = np.random.default_rng([seed, case, day])
    height, width = shape
    folder = root / split / f"case{case}" / f"case{case}_day{day}" / "scans"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[:height, :width]
    for s in range(1, n_slices + 1):
        image = rng.integers(0, 4000, size=shape, dtype=np.uint16)
        cv2.imwrite(str(folder / slice_filename(s, width, height, 1.5, 1.5)), image)
        for c, name in enumerate(CLASSES):
            mask = np.zeros(shape, np.uint8)
            if rng.random() < 0.5:
                cy, cx = rng.integers(4, height - 4), rng.integers(4, width - 4)
                mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= (2 + c) ** 2).astype(np.uint8)
            rows.append({"id": make_id(case, day, s), "class": name, "segmentation": rle_encode(mask)})
    return rows


def write_dataset(root: Path, days: dict[int, list[int]], n_slices: int = 6, shape=(24, 32)) -> Path:
    rows = []
    for case, case_days in days.items():
        for day in case_days:
            rows += write_day(root, case, day, n_slices, shape)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root
