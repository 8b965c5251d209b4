"""The competition score, exact and fast: ``0.4 * Dice + 0.6 * (1 - Hausdorff)``.

- Dice: per (slice, class) row ``2|P∩T| / (|P|+|T|)``; rows empty in both are skipped; the mean
  over the rest (1 when none is left).
- Hausdorff: per day-volume (slices stacked in slice order, the three classes merged), the
  symmetric Hausdorff distance between the voxel sets in the unit cube (coordinates z/S, y/H,
  x/W) divided by sqrt(3); both empty: skipped; one empty: 1. The mean over volumes (0 if none).

The distance is exact (equal to ``scipy.spatial.distance.directed_hausdorff`` on the scaled voxels,
to rounding) without comparing all pairs: :mod:`~pipeline.datasets.uwmgi_metric_runs` reads each mask
once into row runs (the Dice counts come from the same runs), and
:mod:`~pipeline.datasets.uwmgi_metric_hausdorff` searches only the voxels that no nearby voxel of the
other set already bounds below the running maximum, so one volume costs a few passes over its bytes
and a full out-of-fold set (~270 volumes of 144x276x276) scores in seconds.
:func:`hausdorff_volume_edt` is the plain SciPy twin (Euclidean distance transforms on the joint
bounding box) the tests compare with.

Tuning: :func:`volume_stats` gives what one volume adds to the score and :func:`aggregate` sums
them, so a tuner can cache the stats of volumes it did not change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from pipeline.datasets.uwmgi_metric_hausdorff import hausdorff_runs
from pipeline.datasets.uwmgi_metric_runs import class_runs, dice_runs, line_runs, union_runs
from pipeline.rle_format import as_uint8

DICE_WEIGHT = 0.4
HAUSDORFF_WEIGHT = 0.6
_SQRT3 = math.sqrt(3.0)


# ---------------------------------------------------------------- arrays API


def _check_pair(pred: np.ndarray, truth: np.ndarray, ndim: int, what: str) -> None:
    if pred.ndim != ndim or pred.shape != truth.shape:
        raise ValueError(
            f"{what}: prediction {pred.shape} and truth {truth.shape} must be equal {ndim}-D shapes"
        )


def hausdorff_volume(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Normalised Hausdorff distance of two (S, H, W) masks; None when both are empty, 1 when one is."""
    p, t = as_uint8(pred), as_uint8(truth)
    _check_pair(p, t, 3, "hausdorff_volume")
    n_s, n_h, n_w = p.shape
    rows = (n_s * n_h, n_w)
    return hausdorff_runs(line_runs(p.reshape(rows)), line_runs(t.reshape(rows)), p.shape)


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


@dataclass(frozen=True)
class Reference:
    """The truth side of :func:`volume_stats` digested once (its runs), for scoring many predictions."""

    shape: tuple[int, ...]  # (S, C, H, W)
    runs: tuple  # class_runs of the truth
    union: tuple  # union_runs of its classes


def reference(truth: np.ndarray | Reference) -> Reference:
    """The :class:`Reference` of an (S, C, H, W) truth mask (bool or uint8); a Reference is returned as is."""
    if isinstance(truth, Reference):
        return truth
    t = as_uint8(truth)
    if t.ndim != 4:
        raise ValueError(f"reference: truth must be (S, C, H, W), got {t.shape}")
    runs = class_runs(t)
    return Reference(t.shape, runs, union_runs(*runs))


def volume_stats(
    pred: np.ndarray,
    truth: np.ndarray | Reference,
    per_class: bool = True,
    grid: tuple[int, int, int] | None = None,
) -> VolumeStats:
    """Dice rows and Hausdorff distances of one (S, C, H, W) day-volume (bool or uint8 masks).

    ``truth`` may be a :func:`reference` (scoring many predictions against one truth). ``grid`` is
    the (S, H, W) of the whole volume when ``pred`` and ``truth`` are cut from it to a box holding
    all their foreground: the distances are scaled by the whole volume, so the stats are those of
    the uncut pair (rows outside the box are empty in both, and so never counted).
    """
    p, ref = as_uint8(pred), reference(truth)
    if p.ndim != 4 or p.shape != ref.shape:
        raise ValueError(f"volume_stats: prediction {p.shape} and truth {ref.shape} must be equal 4-D shapes")
    n_s, n_c, n_h, n_w = p.shape
    runs_p, runs_t = class_runs(p), ref.runs
    counts = dice_runs(*runs_p, *runs_t, n_h)  # type: ignore[call-arg]  # a numba kernel
    total = counts[..., 0] + counts[..., 1]
    kept = total > 0
    dice = np.where(kept, 2.0 * counts[..., 2] / np.maximum(total, 1), 0.0)
    shape = (n_s, n_h, n_w)
    scale = shape if grid is None else (int(grid[0]), int(grid[1]), int(grid[2]))
    merged = hausdorff_runs(union_runs(*runs_p), ref.union, shape, scale)
    per: tuple[float | None, ...] = ()
    if per_class:
        per = tuple(
            hausdorff_runs((runs_p[0][c], *runs_p[1:]), (runs_t[0][c], *runs_t[1:]), shape, scale)
            for c in range(n_c)
        )
    return VolumeStats(dice.sum(axis=0), kept.sum(axis=0), merged, per)


def _mean(values: list[float], empty: float) -> float:
    return float(np.mean(values)) if values else empty


def _score(dice: float, hausdorff: float) -> float:
    return DICE_WEIGHT * dice + HAUSDORFF_WEIGHT * (1.0 - hausdorff)


def aggregate(stats: Iterable[VolumeStats], classes: tuple[str, ...]) -> dict:
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
            c_h = _mean([h for st in stats if (h := st.class_hausdorff[c]) is not None], 0.0)
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
    classes: tuple[str, ...],
    per_class: bool = True,
    progress: bool = False,
    workers: int = 1,
) -> dict:
    """Score {volume: (S, C, H, W) mask} predictions against truths with the same keys and shapes.

    ``per_class=False`` skips the per-class distances (analysis only) for speed; ``workers`` > 1
    scores volumes in threads (the kernels release the GIL).
    """
    missing = [k for k in truths if k not in preds]
    extra = [k for k in preds if k not in truths]
    if missing or extra:
        raise ValueError(
            f"score_volumes: predictions and truths must cover the same day-volumes; "
            f"missing predictions {first_items(missing)}; predictions without truth {first_items(extra)}"
        )

    def one(key: str) -> VolumeStats:
        pred, truth = np.asarray(preds[key]), np.asarray(truths[key])
        if pred.shape != truth.shape or truth.ndim != 4 or truth.shape[1] != len(classes):
            raise ValueError(
                f"score_volumes: {key}: prediction {pred.shape} and truth {truth.shape} must both be "
                f"(S, {len(classes)}, H, W)"
            )
        return volume_stats(pred, truth, per_class)

    keys = list(truths)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(one, keys) if workers > 1 else map(one, keys)
        stats = list(tqdm(results, total=len(keys), desc="score", unit="day", disable=not progress))
    return aggregate(stats, classes)


def first_items(items: list, n: int = 5) -> str:
    """'a, b, c ... (12 in all)' for error messages; 'none' when empty."""
    if not items:
        return "none"
    head = ", ".join(str(i) for i in items[:n])
    return head if len(items) <= n else f"{head} ... ({len(items)} in all)"
