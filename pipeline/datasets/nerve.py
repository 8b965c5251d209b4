"""Ultrasound Nerve Segmentation (Kaggle ``ultrasound-nerve-segmentation``): the brachial plexus.

Layout: ``train/<subject>_<img>.tif`` (420 rows x 580 columns, grayscale uint8) with
``train/<subject>_<img>_mask.tif``; ``train_masks.csv`` (``subject,img,pixels``) holds the labels
as 1-indexed **column-major** RLE (the label source used here); ``test/<img>.tif``;
``sample_submission.csv`` (``img,pixels``). The phantom keeps the test answers apart in
``test_labels.csv`` (``img,pixels``).

One class (``nerve``); group = subject; no volumes: images are 2D (``data.k = 0``), a subject's
frames are batched together as a "volume" only for caching, and test images in blocks of
:data:`TEST_BLOCK` frames of one size (a frame of another size is predicted at its own size).
The metric (mean per-image Dice, empty vs empty = 1) and the submission writer:
:mod:`pipeline.datasets.nerve_submission`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.data.images import read_tiff, tiff_shape
from pipeline.data.stats import DataStats
from pipeline.datasets import nerve_submission
from pipeline.datasets.base import DatasetSpec, Encoder, Phantom, SubmissionWriter
from pipeline.datasets.common import decode_rle, read_csv_strings, sort_catalog, volume_shape
from pipeline.errors import DataError

CLASSES = ("nerve",)
TRAIN_RE = re.compile(r"^(?P<subject>\d+)_(?P<img>\d+)$")
TEST_RE = re.compile(r"^(?P<img>\d+)$")
TEST_BLOCK = 32  # test images of one size batched per "volume"
COLUMNS = ["id", "group", "volume_id", "slice", "path", "height", "width", "px", "py"]


def scan_nerve(root: Path, split: str = "train") -> pd.DataFrame:
    """``train/<subject>_<img>.tif`` (group = subject) or ``test/<img>.tif`` (:func:`batch_names`)."""
    base = Path(root) / split
    rows: list[tuple] = []
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


class Nerve(DatasetSpec):
    """The nerve plug-in: a 2D single-class dataset whose labels are one CSV of column-major RLE strings.

    A plug-in author copying it fills in, in order:

    - declarations: one class, one channel, not ``volumetric`` (frames: no 2.5D, 2D components, no
      z-continuity), column-major RLE, ``labels_file`` (train_masks.csv: the cache is rebuilt when
      it changes), the Kaggle competition, and ``config_defaults`` (2D input of whole frames);
    - layout: :meth:`scan` lists the frames (a subject's frames batched as one "volume"),
      :meth:`load_split` joins train_masks.csv's RLE, :meth:`presence` reads a non-blank RLE as a nerve;
    - images: :meth:`read_image` one grayscale TIFF, :meth:`read_masks` decodes the RLE column;
    - metric: mean per-image Dice (:mod:`~pipeline.datasets.nerve_submission`);
    - submission: ``img,pixels`` in sample_submission's rows, with the all-full / all-identical refusal;
    - phantom and statistics: the synthetic ultrasound frames of ``make data``; the nerve size, place
      and contrast figures the phantom is calibrated against.
    """

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

    # ------------------------------------------------------------------ layout

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

    # ------------------------------------------------------------------ images

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray:
        image = read_tiff(path)
        if image.ndim == 3:
            image = image[..., 0]
        if image.shape != (height, width):
            raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected {width}x{height}")
        return image

    def read_masks(self, rows: pd.DataFrame) -> np.ndarray:
        shape = volume_shape(rows)
        where = "train_masks.csv ({})"
        masks = [
            decode_rle(rle, shape, self.rle_order, where.format(i), DataError)
            for i, rle in zip(rows["id"], rows["pixels"])
        ]
        return np.stack(masks)[:, None]

    # ------------------------------------------------------------------ metric

    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> nerve_submission.NerveStats:
        return nerve_submission.nerve_stats(pred, truth)

    def aggregate(self, stats: Any) -> dict:
        return nerve_submission.nerve_aggregate(stats)

    # ------------------------------------------------------------------ submission

    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:
        return nerve_submission.NerveSubmissionWriter(root, out, catalog, encode, self.rle_order, force)

    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:
        test = scan_nerve(root, "test")
        return nerve_submission.score_files(submission, truth, test, Path(root) / "test", self.rle_order)

    # ------------------------------------------------------------------ phantom and statistics

    def phantom(self) -> Phantom:
        from pipeline.phantoms import nerve as phantom_nerve

        return Phantom(phantom_nerve.PRESETS, phantom_nerve.generate_nerve, phantom_nerve.format_stats)

    def describe_folder(self, root: Path) -> DataStats:
        from pipeline.datasets import nerve_figures

        return nerve_figures.describe(self, Path(root), read_train_masks(root))


DATASET = Nerve()
