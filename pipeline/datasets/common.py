"""The parts dataset plug-ins share: catalog checks, per-slice Dice/IoU, RLE and CSV reading with
one-line errors. A plug-in imports what it needs; none of it names a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError, SubmissionError
from pipeline.rle import RLEError, rle_decode

CATALOG_COLUMNS = ["id", "group", "volume_id", "slice", "path", "height", "width", "px", "py"]


def sort_catalog(
    frame: pd.DataFrame, where: Path | str, keys: Sequence[str] = ("group", "volume_id", "slice")
) -> pd.DataFrame:
    """Check ids are unique and order a catalog by ``keys`` (numeric columns sort numerically)."""
    if frame.empty:
        return pd.DataFrame(columns=frame.columns if len(frame.columns) else CATALOG_COLUMNS)
    dup = frame[frame["id"].duplicated(keep=False)]
    if not dup.empty:
        raise DataError(
            f"{where}: two image files for id {dup['id'].iloc[0]}: {', '.join(map(str, dup['path']))}"
        )
    return frame.sort_values(list(keys), kind="stable").reset_index(drop=True)


def check_slices(catalog: pd.DataFrame) -> None:
    """Every volume must hold its slices 1..N, each once (both Kaggle sets number them so).

    A missing slice would let 2.5D stacks and 3D patches join slices that are not neighbours, and the
    volumetric metrics measure a volume with a hole; the first damaged volume is named with its
    missing (or repeated) slice numbers.
    """
    for volume_id, rows in catalog.groupby("volume_id", sort=False):
        numbers = rows["slice"].astype(int)
        repeated = sorted(set(numbers[numbers.duplicated()]))
        missing = sorted(set(range(1, int(numbers.max()) + 1)) - set(numbers))
        if not (missing or repeated):
            continue
        folder = Path(rows["path"].iloc[0]).parent
        if missing:
            problem = f"lacks slice(s) {_numbers(missing)} of 1..{int(numbers.max())}"
            fix = "restore the missing images (and their masks)"
        else:
            problem = f"has slice(s) {_numbers(repeated)} twice"
            fix = "keep one file per slice"
        raise DataError(
            f"{volume_id} ({folder}) {problem}: 2.5D stacks and 3D patches would join slices that are "
            f"not neighbours; {fix}, or move the whole volume out of the split"
        )


def _numbers(values: Sequence[int], shown: int = 10) -> str:
    text = ", ".join(str(v) for v in values[:shown])
    return text + (f" ... ({len(values)} in all)" if len(values) > shown else "")


def check_one_size(rows: pd.DataFrame) -> tuple[int, int]:
    """The (height, width) every image of one volume's ``rows`` shares; an odd image is named."""
    sizes = list(zip(rows["height"].astype(int), rows["width"].astype(int)))
    common = max(dict.fromkeys(sizes), key=sizes.count)  # ties: the first
    odd = [i for i, size in enumerate(sizes) if size != common]
    if odd:
        first = rows.iloc[odd[0]]
        raise DataError(
            f"{first['path']}: image is {int(first['width'])}x{int(first['height'])}, but the other images of "
            f"{first['volume_id']} are {common[1]}x{common[0]} ({len(odd)} of {len(rows)} differ); every "
            "image of a volume must share its size: replace the file or move it out"
        )
    return common


def volume_shape(rows: pd.DataFrame) -> tuple[int, int]:
    """(height, width) of a volume's rows (their first image)."""
    return int(rows["height"].iloc[0]), int(rows["width"].iloc[0])


def slice_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(S, C) Dice of every (slice, class) of (S, C, H, W) masks; 1 where both are empty."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if p.shape != t.shape or p.ndim != 4:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} must be equal (S, C, H, W) shapes")
    inter = np.count_nonzero(p & t, axis=(2, 3))
    total = np.count_nonzero(p, axis=(2, 3)) + np.count_nonzero(t, axis=(2, 3))
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def slice_iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(S, C) IoU of every (slice, class); 1 where both are empty."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    inter = np.count_nonzero(p & t, axis=(2, 3))
    union = np.count_nonzero(p | t, axis=(2, 3))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def decode_rle(
    rle: str, shape: tuple[int, int], order: str, where: str, error: type[ValueError]
) -> np.ndarray:
    """An RLE string decoded, its problem raised as ``error`` (DataError for truth, SubmissionError for a submission)."""
    try:
        return rle_decode(rle, shape, order, where=where)
    except RLEError as err:
        raise error(str(err)) from None


def read_csv_strings(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    """A CSV as strings (blanks ""), with a one-line error naming the file and the missing columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing} (expected {','.join(columns)})")
    return frame


def check_submission_rows(sub: pd.DataFrame, truth: pd.DataFrame, key: str, what: str, where: Path) -> None:
    """A submission holds each ``key`` of the truth exactly once and nothing else (``what``: "ids", "images")."""
    dup = sub[key][sub[key].duplicated()]
    if len(dup):
        raise SubmissionError(f"{where}: {key} {dup.iloc[0]} appears twice")
    missing = sorted(set(truth[key]) - set(sub[key]))
    extra = sorted(set(sub[key]) - set(truth[key]))
    if missing or extra:
        raise SubmissionError(
            f"{where}: {len(missing)} truth {what} have no row (first {missing[:1]}), "
            f"{len(extra)} rows are not in the truth (first {extra[:1]})"
        )
