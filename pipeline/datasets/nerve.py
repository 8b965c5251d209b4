"""Ultrasound Nerve Segmentation (Kaggle ``ultrasound-nerve-segmentation``): the brachial plexus.

Layout: ``train/<subject>_<img>.tif`` (420 rows x 580 columns, grayscale uint8) with
``train/<subject>_<img>_mask.tif``; ``train_masks.csv`` (``subject,img,pixels``) holds the labels
as 1-indexed **column-major** RLE (the label source used here); ``test/<img>.tif``;
``sample_submission.csv`` (``img,pixels``). The phantom keeps the test answers apart in
``test_labels.csv`` (``img,pixels``).

One class (``nerve``); group = subject; no volumes: images are 2D (``data.k = 0``), a subject's
frames are batched together as a "volume" only for caching, and test images in blocks of
:data:`TEST_BLOCK` frames of one size (a frame of another size is predicted at its own size).
Metric: mean over images of Dice, where an empty prediction of an empty truth scores 1 (an
all-empty submission scored about 0.53 on the real leaderboard). The writer refuses a submission
whose masks are all full or all identical (the all-white ``1 243600`` failure) unless forced.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.data.images import read_tiff, tiff_shape
from pipeline.data.volumes import Volume
from pipeline.datasets.base import (
    DatasetSpec,
    Encoder,
    Phantom,
    SubmissionWriter,
    decode_rle,
    read_csv_strings,
    slice_dice,
    sort_catalog,
)
from pipeline.errors import DataError, SubmissionError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

CLASSES = ("nerve",)
TRAIN_RE = re.compile(r"^(?P<subject>\d+)_(?P<img>\d+)$")
TEST_RE = re.compile(r"^(?P<img>\d+)$")
TEST_BLOCK = 32  # test images of one size batched per "volume"
COLUMNS = ["id", "group", "volume_id", "slice", "path", "height", "width", "px", "py"]


def scan_nerve(root: Path, split: str = "train") -> pd.DataFrame:
    """``train/<subject>_<img>.tif`` (group = subject) or ``test/<img>.tif`` (:func:`batch_names`)."""
    base = Path(root) / split
    rows = []
    pattern = TRAIN_RE if split == "train" else TEST_RE
    files = sorted(p for p in base.glob("*.tif") if not p.stem.endswith("_mask")) if base.is_dir() else []
    for tif in files:
        match = pattern.match(tif.stem)
        if not match:
            expected = "<subject>_<img>.tif" if split == "train" else "<img>.tif"
            raise DataError(f"{tif}: file name is not {expected}; rename it or move it out of {base}")
        shape = tiff_shape(tif)
        if split == "train":
            subject, img = int(match["subject"]), int(match["img"])
            rows.append((tif.stem, subject, f"subject{subject}", img, str(tif), shape[0], shape[1], 1.0, 1.0))
        else:
            img = int(match["img"])
            rows.append((tif.stem, "test", "", img, str(tif), shape[0], shape[1], 1.0, 1.0))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if split != "train" and not frame.empty:
        frame = frame.sort_values("slice", kind="stable").reset_index(drop=True)
        frame["volume_id"] = batch_names(frame)
    return sort_catalog(frame, base, ("group", "slice") if split == "train" else ("slice",))


def batch_names(frame: pd.DataFrame) -> list[str]:
    """Batch names ``test<NNNN>`` of test frames in img order: blocks of TEST_BLOCK frames of one size.

    Frames are independent images, so a frame of another size (a cut or re-exported file) gets its
    own block and is predicted and encoded at its size; sizes are numbered in order of first frame.
    """
    sizes = list(zip(frame["height"].astype(int), frame["width"].astype(int)))
    count = dict.fromkeys(sizes, 0)
    rank = []
    for size in sizes:
        rank.append(count[size])
        count[size] += 1
    first, start = 0, {}
    for size, n in count.items():
        start[size] = first
        first += -(-n // TEST_BLOCK)
    return [f"test{start[size] + r // TEST_BLOCK:04d}" for size, r in zip(sizes, rank)]


def read_train_masks(root: Path) -> pd.DataFrame:
    """``train_masks.csv`` indexed by id ``<subject>_<img>`` with its ``pixels`` RLE ("" = no nerve)."""
    path = Path(root) / "train_masks.csv"
    frame = read_csv_strings(path, ("subject", "img", "pixels"), "labels file train_masks.csv")
    bad = ~(frame["subject"].str.fullmatch(r"\d+") & frame["img"].str.fullmatch(r"\d+"))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path} row {row + 2}: subject and img must be integers, got {frame.iloc[row].to_dict()}"
        )
    frame["id"] = frame["subject"].astype(int).astype(str) + "_" + frame["img"].astype(int).astype(str)
    dup = frame["id"][frame["id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: image {dup.iloc[0]} has two rows; keep one")
    return frame.set_index("id")[["pixels"]].assign(pixels=lambda f: f["pixels"].str.strip())


def _decode(rle: str, shape: tuple[int, int], where: str, error: type[ValueError]) -> np.ndarray:
    return decode_rle(rle, shape, "F", where, error)


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


def nerve_aggregate(stats: list[NerveStats]) -> dict:
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

    def __init__(self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool) -> None:
        self.out, self.encode, self.force = Path(out), encode, force
        sample = Path(root) / "sample_submission.csv"
        if sample.is_file() and "debug" not in catalog.columns:
            self.rows = list(read_csv_strings(sample, ("img", "pixels"), "sample_submission.csv")["img"])
        else:
            self.rows = list(catalog["id"])
        self.sizes = dict(zip(catalog["id"], (catalog["height"] * catalog["width"]).astype(int)))
        self.predicted: dict[str, str] = {}

    def add(self, volume: Volume, masks: np.ndarray) -> None:
        self.predicted.update(zip(volume.ids, self.encode(masks[:, 0], "F")))

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


class Nerve(DatasetSpec):
    name: ClassVar[str] = "nerve"
    title: ClassVar[str] = "Ultrasound Nerve"
    classes: ClassVar[tuple[str, ...]] = CLASSES
    channels: ClassVar[int] = 1
    volumetric: ClassVar[bool] = False  # frames, not a 3D stack: 2D components, no 2.5D
    rle_order: ClassVar[str] = "F"
    labels_file: ClassVar[str | None] = "train_masks.csv"
    kaggle_source: ClassVar[tuple[str, str]] = ("competition", "ultrasound-nerve-segmentation")
    metric_keys: ClassVar[tuple[str, ...]] = ("score", "dice_nonempty", "empty_accuracy")
    config_defaults: ClassVar[dict[str, Any]] = {
        stage: {"data": {"k": 0, "crop": False}} for stage in ("det", "cls", "seg")
    }

    def scan(self, root: Path, split: str = "train") -> pd.DataFrame:
        return scan_nerve(root, split)

    def load_split(self, root: Path, split: str = "train") -> pd.DataFrame:
        catalog = super().load_split(root, split)
        if split != "train":
            return catalog
        labels = read_train_masks(root)
        no_label = sorted(set(catalog["id"]) - set(labels.index))
        if no_label:
            raise DataError(
                f"{Path(root) / 'train_masks.csv'}: {len(no_label)} train images have no row (first {no_label[0]})"
            )
        no_image = sorted(set(labels.index) - set(catalog["id"]))
        if no_image:
            raise DataError(
                f"{Path(root) / 'train_masks.csv'}: {len(no_image)} rows have no image under train/ (first {no_image[0]})"
            )
        return catalog.join(labels, on="id")

    def has_labels(self, catalog: pd.DataFrame) -> bool:
        return "pixels" in catalog.columns

    def presence(self, catalog: pd.DataFrame) -> pd.DataFrame:
        if "pixels" not in catalog.columns:
            raise DataError("the nerve catalog has no labels: training needs train_masks.csv")
        return (
            catalog.set_index("id")[["pixels"]]
            .apply(lambda col: col.str.len() > 0)
            .set_axis(["nerve"], axis=1)
        )

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray:
        image = read_tiff(path)
        if image.ndim == 3:
            image = image[..., 0]
        if image.shape != (height, width):
            raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected {width}x{height}")
        return image

    def read_masks(self, rows: pd.DataFrame) -> np.ndarray:
        shape = (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
        return np.stack(
            [
                _decode(r, shape, f"train_masks.csv ({i})", DataError)
                for i, r in zip(rows["id"], rows["pixels"])
            ]
        )[:, None]

    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> NerveStats:
        return nerve_stats(pred, truth)

    def aggregate(self, stats: Any) -> dict:
        return nerve_aggregate(stats)

    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:
        return NerveSubmissionWriter(root, out, catalog, encode, force)

    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:
        sub = read_csv_strings(submission, ("img", "pixels"), "submission")
        labels = read_csv_strings(truth, ("img", "pixels"), "truth")
        dup = sub["img"][sub["img"].duplicated()]
        if len(dup):
            raise SubmissionError(f"{submission}: img {dup.iloc[0]} appears twice")
        missing = sorted(set(labels["img"]) - set(sub["img"]))
        extra = sorted(set(sub["img"]) - set(labels["img"]))
        if missing or extra:
            raise SubmissionError(
                f"{submission}: {len(missing)} truth images have no row (first {missing[:1]}), "
                f"{len(extra)} rows are not in the truth (first {extra[:1]})"
            )
        catalog = scan_nerve(root, "test").set_index("id")
        unknown = sorted(set(labels["img"]) - set(catalog.index))
        if unknown:
            raise DataError(
                f"{truth}: {len(unknown)} images have no file under {Path(root) / 'test'} (first {unknown[0]})"
            )
        predicted = dict(zip(sub["img"], sub["pixels"]))
        stats = []
        for img, rle in zip(labels["img"], labels["pixels"]):
            shape = (int(catalog.at[img, "height"]), int(catalog.at[img, "width"]))
            pred = _decode(predicted[img], shape, f"{submission} (img {img})", SubmissionError)
            true = _decode(rle, shape, f"{truth} (img {img})", DataError)
            stats.append(nerve_stats(pred[None, None], true[None, None]))
        return nerve_aggregate(stats)

    def phantom(self) -> Phantom:
        from pipeline.data import phantom_nerve

        return Phantom(phantom_nerve.PRESETS, phantom_nerve.generate_nerve, phantom_nerve.format_stats)


DATASET = Nerve()
