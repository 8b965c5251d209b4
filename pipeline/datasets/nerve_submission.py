"""Ultrasound Nerve's metric and submission: mean per-image Dice, the ``img,pixels`` CSV.

Metric: the mean over images of Dice, where an empty prediction of an empty truth scores 1 (an
all-empty submission scored about 0.53 on the real leaderboard). The writer refuses a submission whose
masks are all full or all identical (the all-white ``1 243600`` failure) unless forced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.volumes import Volume
from pipeline.datasets.base import Encoder, SubmissionWriter
from pipeline.datasets.common import check_submission_rows, decode_rle, read_csv_strings, slice_dice
from pipeline.errors import DataError, SubmissionError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NerveStats:
    """Per-image Dice sum (empty vs empty = 1), image count, and the empty-image bookkeeping."""

    dice_sum: float
    n_images: int
    nonempty_dice_sum: float
    n_nonempty: int
    empty_correct: int  # empty truths predicted empty
    n_empty: int


def nerve_stats(pred: np.ndarray, truth: np.ndarray) -> NerveStats:
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    dice = slice_dice(p, t)[:, 0]
    has_t = t.reshape(len(t), -1).any(axis=1)
    has_p = p.reshape(len(p), -1).any(axis=1)
    return NerveStats(
        float(dice.sum()), len(dice), float(dice[has_t].sum()), int(has_t.sum()),
        int((~has_t & ~has_p).sum()), int((~has_t).sum()),
    )  # fmt: skip


def nerve_aggregate(stats: Sequence[NerveStats]) -> dict:
    """Mean per-image Dice (the competition score), Dice over images with a nerve, empty accuracy."""
    stats = list(stats)
    n = sum(s.n_images for s in stats)
    n_pos, n_empty = sum(s.n_nonempty for s in stats), sum(s.n_empty for s in stats)
    score = sum(s.dice_sum for s in stats) / n if n else 1.0
    return {
        "score": score,
        "dice_nonempty": sum(s.nonempty_dice_sum for s in stats) / n_pos if n_pos else 1.0,
        "empty_accuracy": sum(s.empty_correct for s in stats) / n_empty if n_empty else 1.0,
        "per_class": {"nerve": {"score": score}},
        "n_images": n,
    }


def check_masks_sane(rles: list[str], size: int | list[int], where: str) -> None:
    """Refuse the tell-tale failures: every mask full (``1 <H*W>``), or every mask the same.

    ``size``: H*W of every image, or of each image in ``rles``' order.
    """
    sizes = [size] * len(rles) if isinstance(size, int) else list(size)
    if len(rles) > 1 and all(r == f"1 {n}" for r, n in zip(rles, sizes)):
        raise SubmissionError(
            f"{where}: every predicted mask is the whole image ('1 {sizes[0]}'): the model or its threshold "
            "is broken (check the tuned threshold and the input scaling); pass --force to write it anyway"
        )
    if len(rles) > 1 and len(set(rles)) == 1:
        what = "empty" if not rles[0] else f"'{rles[0][:40]}'"
        raise SubmissionError(
            f"{where}: all {len(rles)} predicted masks are identical ({what}): the model did not look at "
            "the images (or the gate emptied everything); pass --force to write it anyway"
        )


class NerveSubmissionWriter(SubmissionWriter):
    """``img,pixels`` (column-major RLE) in the rows and order of sample_submission.csv."""

    def __init__(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, order: str, force: bool
    ) -> None:
        self.out, self.encode, self.order, self.force = Path(out), encode, order, force
        sample = Path(root) / "sample_submission.csv"
        if sample.is_file() and "debug" not in catalog.columns:
            self.rows = list(read_csv_strings(sample, ("img", "pixels"), "sample_submission.csv")["img"])
        else:
            self.rows = list(catalog["id"])
        self.sizes = dict(zip(catalog["id"], (catalog["height"] * catalog["width"]).astype(int)))
        self.predicted: dict[str, str] = {}

    def add(self, volume: Volume, masks: np.ndarray) -> None:
        self.predicted.update(zip(volume.ids, self.encode(masks[:, 0], self.order)))

    def finish(self) -> Path:
        missing = [i for i in self.rows if i not in self.predicted]
        if missing and self.predicted:
            raise SubmissionError(
                f"{self.out}: {len(missing)} sample_submission images have no test image (first {missing[0]})"
            )
        pixels = [self.predicted.get(i, "") for i in self.rows]
        if not self.force:
            check_masks_sane(pixels, [self.sizes.get(i, 0) for i in self.rows], str(self.out))
        with atomic_path(self.out) as tmp:
            pd.DataFrame({"img": self.rows, "pixels": pixels}).to_csv(tmp, index=False)
        log.info("%s: %d images, %d with a nerve", self.out, len(pixels), sum(1 for p in pixels if p))
        return self.out


def score_files(submission: Path, truth: Path, test: pd.DataFrame, test_dir: Path, order: str) -> dict:
    """The ``img,pixels`` CSV against ``test_labels.csv``; frame shapes from the ``test`` catalog (the
    images under ``test_dir``); ``order``: the RLE order."""
    sub = read_csv_strings(submission, ("img", "pixels"), "submission")
    labels = read_csv_strings(truth, ("img", "pixels"), "truth")
    check_submission_rows(sub, labels, "img", "images", submission)
    catalog = test.set_index("id")
    unknown = sorted(set(labels["img"]) - set(catalog.index))
    if unknown:
        raise DataError(f"{truth}: {len(unknown)} images have no file under {test_dir} (first {unknown[0]})")
    predicted = dict(zip(sub["img"], sub["pixels"]))
    stats = []
    for img, rle in zip(labels["img"], labels["pixels"]):
        shape = (int(catalog.at[img, "height"]), int(catalog.at[img, "width"]))
        pred = decode_rle(predicted[img], shape, order, f"{submission} (img {img})", SubmissionError)
        true = decode_rle(rle, shape, order, f"{truth} (img {img})", DataError)
        stats.append(nerve_stats(pred[None, None], true[None, None]))
    return nerve_aggregate(stats)
