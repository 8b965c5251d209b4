"""The competition score, exact and fast: ``0.4 * Dice + 0.6 * (1 - Hausdorff)``.

- Dice: per (slice, class) row ``2|P∩T| / (|P|+|T|)``; rows empty in both are skipped; the mean
  over the rest (1 when none is left).
- Hausdorff: per day-volume (slices stacked in slice order, the three classes merged), the
  symmetric Hausdorff distance between the voxel sets in the unit cube (coordinates z/S, y/H,
  x/W) divided by sqrt(3); both empty: skipped; one empty: 1. The mean over volumes (0 if none).

The distance is exact (equal to ``scipy.spatial.distance.directed_hausdorff`` on the scaled voxels,
to rounding) without comparing all pairs: :mod:`pipeline.metric_kernels` works on row runs and
stops each nearest-voxel search as soon as it cannot change the maximum, so a full out-of-fold set
(~270 volumes of 144x276x276) scores in seconds. :func:`hausdorff_volume_edt` is the plain SciPy
twin (Euclidean distance transforms on the joint bounding box) the tests compare with.

Tuning: :func:`volume_stats` gives what one volume adds to the score and :func:`aggregate` sums
them, so a tuner can cache the stats of volumes it did not change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import CLASSES
from pipeline.data.catalog import ID_RE, DataError, read_labels, scan_split
from pipeline.metric_kernels import class_runs, dice_counts, hausdorff_runs, row_any, union_runs
from pipeline.rle import RLEError, rle_decode

DICE_WEIGHT = 0.4
HAUSDORFF_WEIGHT = 0.6
_SQRT3 = math.sqrt(3.0)


# ---------------------------------------------------------------- arrays API


def _as_u8(mask: np.ndarray) -> np.ndarray:
    """A uint8 view (bool, uint8) or copy (other dtypes) where non-zero means foreground."""
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if arr.dtype == np.uint8:
        return arr
    return (arr != 0).view(np.uint8)


def _check_pair(pred: np.ndarray, truth: np.ndarray, ndim: int, what: str) -> None:
    if pred.ndim != ndim or pred.shape != truth.shape:
        raise ValueError(
            f"{what}: prediction {pred.shape} and truth {truth.shape} must be equal {ndim}-D shapes"
        )


def hausdorff_volume(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Normalised Hausdorff distance of two (S, H, W) masks; None when both are empty, 1 when one is."""
    p, t = _as_u8(pred), _as_u8(truth)
    _check_pair(p, t, 3, "hausdorff_volume")
    p, t = p[:, None], t[:, None]  # one class
    ptr_p, *runs_p = class_runs(p, row_any(p))
    ptr_t, *runs_t = class_runs(t, row_any(t))
    return hausdorff_runs((ptr_p[0], *runs_p), (ptr_t[0], *runs_t), pred.shape)


def hausdorff_volume_edt(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Plain SciPy twin of :func:`hausdorff_volume`: distance transforms on the joint bounding box.

    Cropping is exact: the nearest voxel of either set lies inside the box of their union.
    """
    from scipy.ndimage import distance_transform_edt

    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    _check_pair(p, t, 3, "hausdorff_volume_edt")
    if not p.any() and not t.any():
        return None
    if not p.any() or not t.any():
        return 1.0
    union = p | t
    box = tuple(
        slice(int(idx[0]), int(idx[-1]) + 1)
        for idx in (np.flatnonzero(union.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    )
    p, t = p[box], t[box]
    sampling = tuple(1.0 / n for n in union.shape)
    d_pt = distance_transform_edt(~t, sampling=sampling)[p].max()
    d_tp = distance_transform_edt(~p, sampling=sampling)[t].max()
    return float(max(d_pt, d_tp)) / _SQRT3


def dice_pair(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """2|P∩T| / (|P|+|T|) of two masks of any shape; None when both are empty."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"dice_pair: prediction {p.shape} and truth {t.shape} differ")
    total = np.count_nonzero(p) + np.count_nonzero(t)
    return None if total == 0 else 2.0 * np.count_nonzero(p & t) / total


@dataclass(frozen=True)
class VolumeStats:
    """What one day-volume adds to the score; :func:`aggregate` sums them (cache them when tuning)."""

    dice_sum: np.ndarray  # (C,) sum of per-row Dice over the rows kept, per class
    n_rows: np.ndarray  # (C,) (slice, class) rows not empty in both
    hausdorff: float | None  # classes merged; None when both are empty
    class_hausdorff: tuple[float | None, ...]  # per class; () when not asked for


def volume_stats(pred: np.ndarray, truth: np.ndarray, per_class: bool = True) -> VolumeStats:
    """Dice rows and Hausdorff distances of one (S, C, H, W) day-volume (bool or uint8 masks)."""
    p, t = _as_u8(pred), _as_u8(truth)
    _check_pair(p, t, 4, "volume_stats")
    fp, ft = row_any(p), row_any(t)
    counts = dice_counts(p, t, fp, ft)
    total = counts[..., 0] + counts[..., 1]
    kept = total > 0
    dice = np.where(kept, 2.0 * counts[..., 2] / np.maximum(total, 1), 0.0)
    n_s, n_c, n_h, n_w = p.shape
    shape = (n_s, n_h, n_w)
    runs_p, runs_t = class_runs(p, fp), class_runs(t, ft)
    merged = hausdorff_runs(union_runs(*runs_p), union_runs(*runs_t), shape)
    per = ()
    if per_class:
        per = tuple(
            hausdorff_runs((runs_p[0][c], *runs_p[1:]), (runs_t[0][c], *runs_t[1:]), shape)
            for c in range(n_c)
        )
    return VolumeStats(dice.sum(axis=0), kept.sum(axis=0), merged, per)


def _mean(values: list[float], empty: float) -> float:
    return float(np.mean(values)) if values else empty


def _score(dice: float, hausdorff: float) -> float:
    return DICE_WEIGHT * dice + HAUSDORFF_WEIGHT * (1.0 - hausdorff)


def aggregate(stats: Iterable[VolumeStats], classes: tuple[str, ...] = CLASSES) -> dict:
    """The score dict from per-volume stats.

    ``n_rows`` counts the Dice rows kept and ``n_volumes`` the volumes in the Hausdorff mean. Per
    class, the same rules apply to that class alone (hausdorff None when not computed).
    """
    stats = list(stats)
    dice_sum = np.zeros(len(classes))
    n_rows = np.zeros(len(classes), np.int64)
    for st in stats:
        dice_sum += st.dice_sum
        n_rows += st.n_rows
    total_rows = int(n_rows.sum())
    dice = float(dice_sum.sum() / total_rows) if total_rows else 1.0
    merged = [st.hausdorff for st in stats if st.hausdorff is not None]
    hausdorff = _mean(merged, 0.0)
    per_class = {}
    for c, name in enumerate(classes):
        c_dice = float(dice_sum[c] / n_rows[c]) if n_rows[c] else 1.0
        c_h = None
        if stats and all(st.class_hausdorff for st in stats):
            c_h = _mean([st.class_hausdorff[c] for st in stats if st.class_hausdorff[c] is not None], 0.0)
        per_class[name] = {
            "dice": c_dice,
            "hausdorff": c_h,
            "score": None if c_h is None else _score(c_dice, c_h),
        }
    return {
        "score": _score(dice, hausdorff),
        "dice": dice,
        "hausdorff": hausdorff,
        "per_class": per_class,
        "n_rows": total_rows,
        "n_volumes": len(merged),
    }


def score_volumes(
    preds: Mapping[str, np.ndarray],
    truths: Mapping[str, np.ndarray],
    per_class: bool = True,
    progress: bool = False,
    workers: int = 1,
) -> dict:
    """Score {case_day: (S, 3, H, W) mask} predictions against truths with the same keys and shapes.

    ``per_class=False`` skips the per-class distances (analysis only) for speed; ``workers`` > 1
    scores volumes in threads (the kernels release the GIL).
    """
    missing = [k for k in truths if k not in preds]
    extra = [k for k in preds if k not in truths]
    if missing or extra:
        raise ValueError(
            f"score_volumes: predictions and truths must cover the same day-volumes; "
            f"missing predictions {_first(missing)}; predictions without truth {_first(extra)}"
        )

    def one(key: str) -> VolumeStats:
        pred, truth = np.asarray(preds[key]), np.asarray(truths[key])
        if pred.shape != truth.shape or truth.ndim != 4 or truth.shape[1] != len(CLASSES):
            raise ValueError(
                f"score_volumes: {key}: prediction {pred.shape} and truth {truth.shape} must both be "
                f"(S, {len(CLASSES)}, H, W)"
            )
        return volume_stats(pred, truth, per_class)

    keys = list(truths)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(one, keys) if workers > 1 else map(one, keys)
        stats = list(tqdm(results, total=len(keys), desc="score", unit="day", disable=not progress))
    return aggregate(stats)


def _first(items: list, n: int = 5) -> str:
    """'a, b, c ... (12 in all)' for error messages; 'none' when empty."""
    if not items:
        return "none"
    head = ", ".join(str(i) for i in items[:n])
    return head if len(items) <= n else f"{head} ... ({len(items)} in all)"


# ---------------------------------------------------------------- submissions

SUBMISSION_COLUMNS = ("id", "class", "predicted")
TRUTH_COLUMNS = ("id", "class", "segmentation")
_RLE_SYNTAX = r"\s*(?:\d+\s+\d+(?:\s+\d+\s+\d+)*)?\s*"


class SubmissionError(ValueError):
    """A submission that cannot be scored: the message names the rows and what is wrong."""


def _keys(frame: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([frame["id"].astype(str), frame["class"].astype(str)])


def _row_names(frame: pd.DataFrame, mask: np.ndarray) -> list[str]:
    rows = np.flatnonzero(mask)
    return [f"row {r} ({frame['id'].iloc[r]}, {frame['class'].iloc[r]})" for r in rows]


def validate_submission(
    sub: pd.DataFrame, truth: pd.DataFrame, shapes: Mapping[str, tuple[int, int]] | None = None
) -> None:
    """Raise :class:`SubmissionError` unless ``sub`` holds exactly the (id, class) rows of ``truth``.

    Checks the columns, duplicated rows, missing and extra (id, class) pairs and the RLE syntax;
    with ``shapes`` ({id: (H, W)}) also that every run fits in its slice. Rows are 0-based
    positions in ``sub`` (CSV line = row + 2).
    """
    missing = [c for c in SUBMISSION_COLUMNS if c not in sub.columns]
    extra = [c for c in sub.columns if c not in SUBMISSION_COLUMNS]
    if missing or extra:
        raise SubmissionError(
            f"submission columns {list(sub.columns)}: missing {missing}, unexpected {extra}; "
            f"expected exactly {','.join(SUBMISSION_COLUMNS)}"
        )
    missing_truth = [c for c in TRUTH_COLUMNS if c not in truth.columns]
    if missing_truth:
        raise DataError(f"truth lacks columns {missing_truth} (expected {','.join(TRUTH_COLUMNS)})")
    dup_truth = truth.duplicated(["id", "class"], keep="first").to_numpy()
    if dup_truth.any():
        raise DataError(f"truth has duplicated (id, class) rows: {_first(_row_names(truth, dup_truth))}")
    dup = sub.duplicated(["id", "class"], keep="first").to_numpy()
    if dup.any():
        raise SubmissionError(
            f"submission has {dup.sum()} duplicated (id, class) rows: {_first(_row_names(sub, dup))}"
        )
    sub_keys, truth_keys = _keys(sub), _keys(truth)
    absent = truth_keys.difference(sub_keys, sort=False)
    if len(absent):
        raise SubmissionError(
            f"submission lacks {len(absent)} (id, class) rows of the truth: {_first(list(absent))}; "
            "every id and class of the truth needs a row (an empty 'predicted' for no mask)"
        )
    unknown = ~sub_keys.isin(truth_keys)
    if unknown.any():
        raise SubmissionError(
            f"submission has {unknown.sum()} (id, class) rows not in the truth: {_first(_row_names(sub, unknown))}"
        )
    predicted = sub["predicted"].fillna("")
    bad = ~predicted.map(lambda v: isinstance(v, str)).to_numpy()
    bad |= ~predicted.astype(str).str.fullmatch(_RLE_SYNTAX).to_numpy()
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise SubmissionError(
            f"malformed RLE in {_row_names(sub, bad)[0]}: {str(predicted.iloc[r])[:60]!r}; expected "
            f"'start length' pairs of positive integers ({bad.sum()} bad rows in all)"
        )
    if shapes is not None:
        for r, (slice_id, name, rle) in enumerate(zip(sub["id"], sub["class"], predicted)):
            if rle:
                if slice_id not in shapes:
                    raise DataError(f"no slice shape for {slice_id} (submission row {r})")
                _decode(rle, shapes[slice_id], f"submission row {r} ({slice_id}, {name})", SubmissionError)


def _decode(rle: str, shape: tuple[int, int], where: str, error: type[ValueError]) -> np.ndarray:
    try:
        return rle_decode(rle, shape, where=where)
    except RLEError as err:
        raise error(str(err)) from None


def slice_shapes(truth: pd.DataFrame, data_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """{id: (H, W)} from ``image_height``/``image_width`` columns, else from the image files.

    Images are looked up under ``data_dir/train`` and ``data_dir/test`` (Kaggle file names
    ``slice_NNNN_W_H_PX_PY.png``). Raises :class:`DataError` naming the ids without a shape.
    """
    ids = pd.unique(truth["id"].astype(str))
    if {"image_height", "image_width"} <= set(truth.columns):
        sizes = truth.drop_duplicates("id")
        height = pd.to_numeric(sizes["image_height"], errors="coerce")
        width = pd.to_numeric(sizes["image_width"], errors="coerce")
        bad = ~((height > 0) & (width > 0)).to_numpy()
        if bad.any():
            raise DataError(
                f"truth: image_height/image_width missing or not positive for ids {_first(list(sizes['id'][bad]))}"
            )
        return dict(
            zip(sizes["id"].astype(str), zip(height.astype(int).tolist(), width.astype(int).tolist()))
        )
    if data_dir is None:
        raise DataError(
            "truth has no image_height/image_width columns and no data dir was given to find the images"
        )
    data_dir = Path(data_dir)
    catalog = pd.concat([scan_split(data_dir, split) for split in ("train", "test")], ignore_index=True)
    catalog = catalog.drop_duplicates("id") if not catalog.empty else catalog
    found = (
        {}
        if catalog.empty
        else dict(zip(catalog["id"], zip(catalog["height"].tolist(), catalog["width"].tolist())))
    )
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(
            f"{len(missing)} ids of the truth have no slice image under {data_dir / 'train'} or "
            f"{data_dir / 'test'}: {_first(missing)} (expected <split>/caseN/caseN_dayD/scans/slice_NNNN_W_H_PX_PY.png, "
            "or add image_height/image_width columns to the truth)"
        )
    return {i: found[i] for i in ids}


def score_submission(
    sub: pd.DataFrame,
    truth: pd.DataFrame,
    shapes: Mapping[str, tuple[int, int]],
    per_class: bool = True,
    progress: bool = False,
) -> dict:
    """Score a Kaggle submission (id, class, predicted) against labels (id, class, segmentation).

    Validates ``sub`` first, then decodes and scores one day-volume at a time (slices stacked by
    the slice number of their id), so memory stays at one volume.
    """
    validate_submission(sub, truth)
    sub = sub.reset_index(drop=True).assign(row=lambda f: np.arange(len(f)))
    table = truth[list(TRUTH_COLUMNS)].merge(sub, on=["id", "class"], how="left", validate="one_to_one")
    parts = table["id"].astype(str).str.extract(ID_RE.pattern)
    if parts.isna().any().any():
        bad = table["id"][parts.isna().any(axis=1)].tolist()
        raise DataError(f"truth ids not of the form case{{N}}_day{{D}}_slice_{{NNNN}}: {_first(bad)}")
    class_idx = table["class"].map({name: c for c, name in enumerate(CLASSES)})
    if class_idx.isna().any():
        raise DataError(
            f"truth classes must be {CLASSES}; found {_first(sorted(set(table['class'][class_idx.isna()])))}"
        )
    table = table.assign(
        case=parts["case"].astype(int),
        day=parts["day"].astype(int),
        slice=parts["slice"].astype(int),
        c=class_idx.astype(int),
    ).sort_values(["case", "day", "slice", "c"], kind="stable")
    table[["segmentation", "predicted"]] = table[["segmentation", "predicted"]].fillna("")
    missing = sorted(set(table["id"]) - set(shapes))
    if missing:
        raise DataError(f"no slice shape for {len(missing)} ids: {_first(missing)}")
    groups = table.groupby(["case", "day"], sort=False)
    stats = [
        volume_stats(*_day_masks(f"case{case}_day{day}", rows, shapes), per_class)
        for (case, day), rows in tqdm(groups, desc="score", unit="day", disable=not progress)
    ]
    return aggregate(stats)


def _day_masks(
    case_day: str, rows: pd.DataFrame, shapes: Mapping[str, tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(S, 3, H, W) prediction and truth masks of one day from its rows."""
    sizes = {tuple(shapes[i]) for i in rows["id"].unique()}
    if len(sizes) != 1:
        raise DataError(f"{case_day}: slices of one day-volume have different shapes {sorted(sizes)}")
    shape = sizes.pop()
    slices = np.unique(rows["slice"].to_numpy())
    s_idx = np.searchsorted(slices, rows["slice"].to_numpy())
    pred = np.zeros((len(slices), len(CLASSES), *shape), np.uint8)
    truth = np.zeros_like(pred)
    for s, c, slice_id, name, seg, rle, row in zip(
        s_idx, rows["c"], rows["id"], rows["class"], rows["segmentation"], rows["predicted"], rows["row"]
    ):
        if seg:
            truth[s, c] = _decode(seg, shape, f"truth ({slice_id}, {name})", DataError)
        if rle:
            pred[s, c] = _decode(rle, shape, f"submission row {row} ({slice_id}, {name})", SubmissionError)
    return pred, truth


def read_submission(path: Path) -> pd.DataFrame:
    """A submission CSV as strings (blank 'predicted' = ""); :class:`SubmissionError` when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"submission file not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SubmissionError(f"{path}: not a readable CSV ({err})") from None


def read_truth(path: Path) -> pd.DataFrame:
    """Labels (``train.csv`` layout, validated by ``read_labels``) plus image_height/width when present."""
    labels = read_labels(path)
    header = pd.read_csv(path, nrows=0).columns
    if {"image_height", "image_width"} <= set(header):
        sizes = pd.read_csv(path, usecols=["id", "image_height", "image_width"], dtype={"id": str})
        labels = labels.join(sizes.drop_duplicates("id").set_index("id"), on="id")
    return labels
