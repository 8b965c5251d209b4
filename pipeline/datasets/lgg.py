"""LGG brain MRI segmentation (Kaggle ``mateuszbuda/lgg-mri-segmentation``): FLAIR tumour masks.

Layout: ``kaggle_3m/TCGA_<inst>_<pid>_<date>/TCGA_<inst>_<pid>_<date>_<k>.tif`` is one 256x256 RGB
uint8 slice whose channels are pre-contrast, FLAIR and post-contrast; the mask beside it is
``..._<k>_mask.tif`` (uint8, 0 or 255). ``k`` starts at 1 and is ordered numerically (``_10``
after ``_9``). ``kaggle_3m/data.csv`` holds per-patient clinical columns. There is no official test
set: ``test/`` holds held-out patients in the same folder shape, and the phantom keeps their
masks apart in ``test_labels.csv`` (``id,segmentation``, row-major RLE).

One class (``tumour``); volume = patient folder; group = patient (``TCGA_<inst>_<pid>``). The metric
and the submission (a CSV plus mask files): :mod:`pipeline.datasets.lgg_submission`; the figures of
``make data-stats``: :mod:`pipeline.datasets.lgg_figures`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.data.images import read_tiff, tiff_shape
from pipeline.data.stats import DataStats
from pipeline.datasets import lgg_figures, lgg_submission
from pipeline.datasets.base import DatasetSpec, Encoder, Phantom, SubmissionWriter
from pipeline.datasets.common import sort_catalog, volume_shape
from pipeline.errors import DataError

CLASSES = ("tumour",)
VOLUME_RE = re.compile(r"^(?P<patient>TCGA_[A-Z0-9]+_[A-Z0-9]+)_(?P<date>\d+)$")
SPLIT_FOLDERS = {"train": "kaggle_3m", "test": "test"}
COLUMNS = ["id", "group", "volume_id", "slice", "path", "height", "width", "px", "py", "mask_path"]


def scan_lgg(root: Path, split: str = "train") -> pd.DataFrame:
    """The slices under ``kaggle_3m/`` (train) or ``test/``, ordered by patient folder and numeric k."""
    base = Path(root) / SPLIT_FOLDERS.get(split, split)
    rows = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        match = VOLUME_RE.match(folder.name)
        if not match:
            raise DataError(
                f"{folder}: folder name is not TCGA_<inst>_<pid>_<date>; rename it or move it out of {base}"
            )
        for tif in folder.glob("*.tif"):
            if tif.stem.endswith("_mask"):
                continue
            k_text = tif.stem.removeprefix(folder.name + "_")
            if not k_text.isdigit() or k_text == tif.stem:
                raise DataError(f"{tif}: expected the file name {folder.name}_<k>.tif with a slice number k")
            mask = tif.with_name(f"{tif.stem}_mask.tif")
            if split == "train" and not mask.is_file():
                raise DataError(f"{tif} has no mask: expected {mask} beside it (every train slice has one)")
            shape = tiff_shape(tif)
            mask_path = str(mask) if mask.is_file() else ""
            rows.append(
                (
                    tif.stem,
                    match["patient"],
                    folder.name,
                    int(k_text),
                    str(tif),
                    *shape[:2],
                    1.0,
                    1.0,
                    mask_path,
                )
            )
    return sort_catalog(pd.DataFrame(rows, columns=COLUMNS), base)


def read_mask(path: str | Path, height: int, width: int) -> np.ndarray:
    """A ``_mask.tif`` as (H, W) uint8 0/1."""
    mask = read_tiff(path)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != (height, width):
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image is {width}x{height}")
    return (mask > 0).astype(np.uint8)


class LGG(DatasetSpec):
    """The LGG plug-in: a multi-channel volumetric dataset whose labels are mask images beside the slices.

    A plug-in author copying it fills in, in order:

    - declarations: one class, three channels (the MR contrasts, kept together in 2.5D stacks),
      ``volumetric`` (a patient's slices form a stack), row-major RLE, no ``labels_file`` (the masks
      are the label files), the Kaggle dataset it comes from, its train folder (``kaggle_3m``), and
      ``config_defaults`` (2.5D of direct neighbours, cropped to the head, for every network stage);
    - layout: :meth:`scan` lists the patient folders and reads from each mask whether the slice holds
      tumour (the ``tumour`` label column); :meth:`presence` is that column;
    - images: :meth:`read_image` one RGB TIFF as (3, H, W), :meth:`read_masks` the ``_mask.tif`` files;
    - metric: per-patient volumetric Dice (:mod:`~pipeline.datasets.lgg_submission`);
    - submission: ``id,predicted`` plus the predicted mask files, scored against ``test_labels.csv``;
    - phantom and statistics: the synthetic heads of ``make data``; the tumour, head and intensity
      figures the phantom is calibrated against (:mod:`~pipeline.datasets.lgg_figures`).
    """

    name: ClassVar[str] = "lgg"
    title: ClassVar[str] = "LGG brain MRI"
    classes: ClassVar[tuple[str, ...]] = CLASSES
    channels: ClassVar[int] = 3  # pre-contrast, FLAIR, post-contrast
    volumetric: ClassVar[bool] = True
    rle_order: ClassVar[str] = "C"
    labels_file: ClassVar[str | None] = None  # labels are the _mask.tif files themselves
    kaggle_source: ClassVar[tuple[str, str]] = ("dataset", "mateuszbuda/lgg-mri-segmentation")
    metric_keys: ClassVar[tuple[str, ...]] = ("score", "slice_dice", "iou")
    train_folder: ClassVar[str] = "kaggle_3m"
    fill_channel: ClassVar[int | None] = 1  # a missing pre- or post-contrast is a copy of FLAIR
    # 2.5D over neighbouring slices of each channel, cropped to the head; 256 px is the native size
    config_defaults: ClassVar[dict[str, Any]] = {
        stage: {"data": {"k": 1, "stride": 1, "crop": True}} for stage in ("det", "cls", "seg")
    }

    # ------------------------------------------------------------------ layout

    def scan(self, root: Path, split: str = "train") -> pd.DataFrame:
        catalog = scan_lgg(root, split)
        if split == "train" and not catalog.empty:
            catalog["tumour"] = [
                bool(read_mask(p, h, w).any())
                for p, h, w in zip(catalog["mask_path"], catalog["height"], catalog["width"])
            ]
        return catalog

    def has_labels(self, catalog: pd.DataFrame) -> bool:
        return "tumour" in catalog.columns

    def presence(self, catalog: pd.DataFrame) -> pd.DataFrame:
        if "tumour" not in catalog.columns:
            raise DataError("the LGG catalog has no masks: training needs the train split (kaggle_3m/)")
        return catalog.set_index("id")[["tumour"]].astype(bool)

    # ------------------------------------------------------------------ images

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray:
        image = read_tiff(path)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise DataError(
                f"{path}: expected a 3-channel (pre-contrast, FLAIR, post-contrast) TIFF, got shape {image.shape}"
            )
        if image.shape[:2] != (height, width):
            raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, expected {width}x{height}")
        return np.ascontiguousarray(np.moveaxis(image, -1, 0))  # (3, H, W)

    def read_masks(self, rows: pd.DataFrame) -> np.ndarray:
        height, width = volume_shape(rows)
        return np.stack([read_mask(p, height, width) for p in rows["mask_path"]])[:, None]

    # ------------------------------------------------------------------ metric

    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> lgg_submission.LGGStats:
        return lgg_submission.lgg_stats(pred, truth)

    def aggregate(self, stats: Any) -> dict:
        return lgg_submission.lgg_aggregate(stats)

    # ------------------------------------------------------------------ submission

    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:
        return lgg_submission.LGGSubmissionWriter(out, catalog, encode, self.rle_order)

    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:
        test = scan_lgg(root, "test")
        return lgg_submission.score_files(submission, truth, test, Path(root) / "test", self.rle_order)

    # ------------------------------------------------------------------ phantom and statistics

    def phantom(self) -> Phantom:
        from pipeline.phantoms import lgg as phantom_lgg

        return Phantom(phantom_lgg.PRESETS, phantom_lgg.generate_lgg, phantom_lgg.format_stats)

    def describe_folder(self, root: Path) -> DataStats:
        return lgg_figures.describe(self, Path(root))


DATASET = LGG()
