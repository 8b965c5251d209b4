"""LGG's metric and submission: per-patient volumetric Dice, the ``id,predicted`` CSV plus mask files.

Metric (Buda et al. 2019): the mean over patients of the volumetric Dice (both empty = 1), reported
with the mean per-slice Dice (empty vs empty = 1) and the mean per-slice IoU. A submission is one CSV
(``id,predicted``, row-major RLE) plus the predicted ``_mask.tif`` files in the test layout, in a
folder beside the CSV (``<csv stem>_masks/<volume>/<id>_mask.tif``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.volumes import Volume
from pipeline.datasets.base import Encoder, SubmissionWriter
from pipeline.datasets.common import (
    check_submission_rows,
    decode_rle,
    read_csv_strings,
    slice_dice,
    slice_iou,
    volume_shape,
)
from pipeline.errors import DataError, SubmissionError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LGGStats:
    """One patient: volumetric Dice (None when both are empty), per-slice Dice and IoU sums."""

    volume_dice: float | None
    slice_dice_sum: float
    slice_iou_sum: float
    n_slices: int


def lgg_stats(pred: np.ndarray, truth: np.ndarray) -> LGGStats:
    """What one patient's (S, 1, H, W) prediction adds to the LGG metric."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    dice = slice_dice(p, t)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    volume = None if total == 0 else 2.0 * np.count_nonzero(p & t) / total
    return LGGStats(volume, float(dice.sum()), float(slice_iou(p, t).sum()), int(dice.size))


def lgg_aggregate(stats: Sequence[LGGStats]) -> dict:
    """Mean per-patient volumetric Dice (both empty = 1), mean per-slice Dice and IoU."""
    stats = list(stats)
    volumes = [1.0 if s.volume_dice is None else s.volume_dice for s in stats]
    n = sum(s.n_slices for s in stats)
    score = float(np.mean(volumes)) if volumes else 1.0
    return {
        "score": score,
        "slice_dice": sum(s.slice_dice_sum for s in stats) / n if n else 1.0,
        "iou": sum(s.slice_iou_sum for s in stats) / n if n else 1.0,
        "per_class": {"tumour": {"score": score}},
        "n_volumes": len(stats),
        "n_slices": n,
    }


class LGGSubmissionWriter(SubmissionWriter):
    """``id,predicted`` (row-major RLE) for every test slice, and the masks as ``_mask.tif`` files."""

    def __init__(self, out: Path, catalog: pd.DataFrame, encode: Encoder, order: str) -> None:
        self.out, self.encode, self.order = Path(out), encode, order
        self.ids = list(catalog["id"])
        self.masks_dir = self.out.with_name(f"{self.out.stem}_masks")
        self.tmp_dir = self.masks_dir.with_name(f".{self.masks_dir.name}.tmp")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.predicted: dict[str, str] = {}

    def add(self, volume: Volume, masks: np.ndarray) -> None:
        import tifffile

        folder = self.tmp_dir / volume.volume_id
        folder.mkdir(exist_ok=True)
        for slice_id, mask in zip(volume.ids, masks[:, 0]):
            tifffile.imwrite(folder / f"{slice_id}_mask.tif", (mask > 0).astype(np.uint8) * 255)
        self.predicted.update(zip(volume.ids, self.encode(masks[:, 0], self.order)))

    def finish(self) -> Path:
        missing = [i for i in self.ids if i not in self.predicted]
        if missing:
            raise SubmissionError(
                f"{self.out}: {len(missing)} test slices were not predicted (first {missing[0]})"
            )
        frame = pd.DataFrame({"id": self.ids, "predicted": [self.predicted[i] for i in self.ids]})
        with atomic_path(self.out) as tmp:
            frame.to_csv(tmp, index=False)
        shutil.rmtree(self.masks_dir, ignore_errors=True)
        self.tmp_dir.rename(self.masks_dir)
        log.info(
            "%s: %d slices (%d non-empty); masks in %s",
            self.out,
            len(frame),
            int((frame["predicted"] != "").sum()),
            self.masks_dir,
        )
        return self.out


def score_files(submission: Path, truth: Path, test: pd.DataFrame, test_dir: Path, order: str) -> dict:
    """The submission CSV against ``test_labels.csv``; slice shapes and order from the ``test`` catalog
    (the images under ``test_dir``); ``order``: the RLE order."""
    sub = read_csv_strings(submission, ("id", "predicted"), "submission")
    labels = read_csv_strings(truth, ("id", "segmentation"), "truth")
    if test.empty:
        raise DataError(f"no test images under {test_dir}: slice shapes and order come from there")
    check_submission_rows(sub, labels, "id", "ids", submission)
    unknown = sorted(set(labels["id"]) - set(test["id"]))
    if unknown:
        raise DataError(f"{truth}: {len(unknown)} ids have no image under {test_dir} (first {unknown[0]})")
    predicted = dict(zip(sub["id"], sub["predicted"]))
    segmentation = dict(zip(labels["id"], labels["segmentation"]))
    stats = []
    for _, rows in test[test["id"].isin(segmentation)].groupby("volume_id", sort=False):
        shape = volume_shape(rows)
        ids = list(rows["id"])
        pred = [decode_rle(predicted[i], shape, order, f"{submission} ({i})", SubmissionError) for i in ids]
        true = [decode_rle(segmentation[i], shape, order, f"{truth} ({i})", DataError) for i in ids]
        stats.append(lgg_stats(np.stack(pred)[:, None], np.stack(true)[:, None]))
    return lgg_aggregate(stats)
