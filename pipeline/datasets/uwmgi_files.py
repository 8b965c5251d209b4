"""UW-Madison GI Tract files: ids, slice images, ``train.csv`` labels and their figures.

``train/case{N}/case{N}_day{D}/scans/slice_{NNNN}_{W}_{H}_{PX}_{PY}.png`` holds one 16-bit slice;
its id is ``case{N}_day{D}_slice_{NNNN}``. ``train.csv`` has three rows per slice
(``id,class,segmentation``, row-major RLE or blank).
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.data.stats import DataStats, pct
from pipeline.datasets.common import sort_catalog
from pipeline.errors import DataError
from pipeline.rle import rle_decode

CLASSES = ("large_bowel", "small_bowel", "stomach")
ID_RE = re.compile(r"^case(?P<case>\d+)_day(?P<day>\d+)_slice_(?P<slice>\d{4})$")
FILE_RE = re.compile(
    r"^slice_(?P<slice>\d{4})_(?P<width>\d+)_(?P<height>\d+)_(?P<px>\d+(?:\.\d+)?)_(?P<py>\d+(?:\.\d+)?)\.png$"
)
COLUMNS = ["id", "group", "volume_id", "slice", "path", "height", "width", "px", "py", "day"]
ORDER = ["group", "day", "slice"]  # numeric: case2 before case10, day3 before day10


def parse_id(slice_id: str) -> tuple[int, int, int]:
    """``case12_day3_slice_0042`` -> (12, 3, 42)."""
    match = ID_RE.match(slice_id)
    if not match:
        raise DataError(f"id '{slice_id}' is not of the form case{{N}}_day{{D}}_slice_{{NNNN}}")
    return int(match["case"]), int(match["day"]), int(match["slice"])


def make_id(case: int, day: int, slice_idx: int) -> str:
    return f"case{case}_day{day}_slice_{slice_idx:04d}"


def slice_filename(slice_idx: int, width: int, height: int, px: float, py: float) -> str:
    return f"slice_{slice_idx:04d}_{width}_{height}_{px:.2f}_{py:.2f}.png"


def scan_split(root: Path, split: str = "train") -> pd.DataFrame:
    """Every slice image under ``root/split`` as a catalog, sorted by case, day, slice.

    An empty or missing split gives an empty catalog (the public Kaggle test folder is empty).
    """
    base = Path(root) / split
    rows = []
    for png in sorted(base.glob("case*/case*_day*/scans/*.png")) if base.is_dir() else []:
        match = FILE_RE.match(png.name)
        if not match:
            raise DataError(
                f"{png}: file name is not slice_NNNN_W_H_PX_PY.png; rename it or remove it from {base}"
            )
        case_day = png.parent.parent.name
        day_match = re.match(r"^case(\d+)_day(\d+)$", case_day)
        if not day_match or png.parent.parent.parent.name != f"case{day_match[1]}":
            raise DataError(f"{png}: expected the folder layout {split}/case{{N}}/case{{N}}_day{{D}}/scans/")
        case, day, slice_idx = int(day_match[1]), int(day_match[2]), int(match["slice"])
        rows.append(
            (
                make_id(case, day, slice_idx),
                case,
                case_day,
                slice_idx,
                str(png),
                int(match["height"]),
                int(match["width"]),
                float(match["px"]),
                float(match["py"]),
                day,
            )
        )
    return sort_catalog(pd.DataFrame(rows, columns=COLUMNS), base, ORDER)


def read_slice(path: str | Path, width: int | None = None, height: int | None = None) -> np.ndarray:
    """One slice as uint16 (H, W); checks the size the file name promises."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"slice image is missing: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"slice image is unreadable (not a PNG, or truncated): {path}")
    if image.ndim == 3:
        image = image[..., 0]
    if image.dtype == np.uint8:
        image = image.astype(np.uint16)
    if image.dtype != np.uint16:
        raise DataError(f"{path}: expected a 16-bit grayscale PNG, got dtype {image.dtype}")
    if width is not None and height is not None and image.shape != (height, width):
        raise DataError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]} but its file name says {width}x{height}"
        )
    return image


def read_labels(csv_path: Path) -> pd.DataFrame:
    """``train.csv`` (or ``test_labels.csv``) as a long table with validated ids and classes.

    Blank segmentations become "". Raises naming the row for an unknown class, a malformed id
    or a duplicated (id, class).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"labels file not found: {csv_path}")
    frame = pd.read_csv(csv_path, dtype={"id": str, "class": str, "segmentation": str}, keep_default_na=False)
    missing = {"id", "class", "segmentation"} - set(frame.columns)
    if missing:
        raise DataError(f"{csv_path}: missing columns {sorted(missing)} (expected id,class,segmentation)")
    bad_class = ~frame["class"].isin(CLASSES)
    if bad_class.any():
        row = int(np.flatnonzero(bad_class)[0])
        raise DataError(
            f"{csv_path} row {row + 2}: unknown class '{frame['class'].iloc[row]}' (expected one of {CLASSES})"
        )
    bad_id = ~frame["id"].str.match(ID_RE.pattern)
    if bad_id.any():
        row = int(np.flatnonzero(bad_id)[0])
        raise DataError(
            f"{csv_path} row {row + 2}: id '{frame['id'].iloc[row]}' is not case{{N}}_day{{D}}_slice_{{NNNN}}"
        )
    dup = frame.duplicated(["id", "class"], keep=False)
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DataError(
            f"{csv_path} row {row + 2}: ({frame['id'].iloc[row]}, {frame['class'].iloc[row]}) appears twice"
        )
    frame["segmentation"] = frame["segmentation"].str.strip()
    return frame[["id", "class", "segmentation"]]


def labels_wide(labels: pd.DataFrame) -> pd.DataFrame:
    """Long labels -> one row per id with a column per class (missing class rows become "")."""
    wide = labels.pivot(index="id", columns="class", values="segmentation")
    wide = wide.reindex(columns=list(CLASSES)).fillna("")
    wide.columns.name = None
    return wide


def attach_labels(
    catalog: pd.DataFrame, labels: pd.DataFrame, csv_path: Path | str = "train.csv"
) -> pd.DataFrame:
    """Join per-class RLE columns onto the catalog; every labelled id must have an image and back."""
    wide = labels_wide(labels)
    no_image = wide.index.difference(catalog["id"])
    if len(no_image):
        raise DataError(
            f"{csv_path}: {len(no_image)} labelled ids have no image, first {no_image[0]} "
            f"(expected {{split}}/caseN/caseN_dayD/scans/slice_NNNN_*.png)"
        )
    no_label = pd.Index(catalog["id"]).difference(wide.index)
    if len(no_label):
        raise DataError(f"{csv_path}: {len(no_label)} images have no label rows, first {no_label[0]}")
    return catalog.join(wide, on="id")


def load_split(root: Path, split: str = "train", labels_csv: str | None = "train.csv") -> pd.DataFrame:
    """Catalog of a split with its labels attached when ``labels_csv`` exists under ``root``."""
    catalog = scan_split(root, split)
    if labels_csv is None:
        return catalog
    csv_path = Path(root) / labels_csv
    if not csv_path.is_file():
        if split == "train":
            raise DataError(f"dataset not found: {csv_path} is missing (run `make data`, or set DATA_DIR)")
        return catalog
    if catalog.empty and split == "train":
        raise DataError(f"no slice images under {Path(root) / split} (run `make data`, or set DATA_DIR)")
    return attach_labels(catalog, read_labels(csv_path), csv_path)


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


def describe_labels(root: Path) -> DataStats:
    """The cheap UW-Madison figures, from ``train.csv`` alone: labelled share and mask areas per class."""
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
