"""LGG brain MRI segmentation (Kaggle ``mateuszbuda/lgg-mri-segmentation``): FLAIR tumour masks.

Layout: ``kaggle_3m/TCGA_<inst>_<pid>_<date>/TCGA_<inst>_<pid>_<date>_<k>.tif`` is one 256x256 RGB
uint8 slice whose channels are pre-contrast, FLAIR and post-contrast; the mask beside it is
``..._<k>_mask.tif`` (uint8, 0 or 255). ``k`` starts at 1 and is ordered numerically (``_10``
after ``_9``). ``kaggle_3m/data.csv`` holds per-patient clinical columns. There is no official test
set: ``test/`` holds held-out patients in the same folder shape, and the phantom keeps their
masks apart in ``test_labels.csv`` (``id,segmentation``, row-major RLE).

One class (``tumour``); volume = patient folder; group = patient (``TCGA_<inst>_<pid>``). Metric:
mean per-patient volumetric Dice (Buda et al. 2019), reported with the mean per-slice Dice (empty
vs empty = 1) and the mean per-slice IoU. A submission is one CSV (``id,predicted``, row-major RLE)
plus the predicted ``_mask.tif`` files in the test layout, in a folder beside the CSV.
"""

from __future__ import annotations

import logging
import re
import shutil
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
    slice_iou,
    sort_catalog,
)
from pipeline.errors import DataError, SubmissionError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

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


def lgg_aggregate(stats: list[LGGStats]) -> dict:
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


def _decode(rle: str, shape: tuple[int, int], where: str, error: type[ValueError]) -> np.ndarray:
    return decode_rle(rle, shape, "C", where, error)


class LGGSubmissionWriter(SubmissionWriter):
    """``id,predicted`` (row-major RLE) for every test slice, and the masks as ``_mask.tif`` files."""

    def __init__(self, out: Path, catalog: pd.DataFrame, encode: Encoder) -> None:
        self.out, self.encode = Path(out), encode
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
        self.predicted.update(zip(volume.ids, self.encode(masks[:, 0], "C")))

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


class LGG(DatasetSpec):
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
    # 2.5D over neighbouring slices of each channel, cropped to the head; 256 px is the native size
    config_defaults: ClassVar[dict[str, Any]] = {
        stage: {"data": {"k": 1, "stride": 1, "crop": True}} for stage in ("det", "cls", "seg")
    }

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
        height, width = int(rows["height"].iloc[0]), int(rows["width"].iloc[0])
        return np.stack([read_mask(p, height, width) for p in rows["mask_path"]])[:, None]

    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> LGGStats:
        return lgg_stats(pred, truth)

    def aggregate(self, stats: Any) -> dict:
        return lgg_aggregate(stats)

    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:
        return LGGSubmissionWriter(out, catalog, encode)

    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:
        """The submission CSV against ``test_labels.csv``; slice shapes and order from ``root/test``."""
        sub = read_csv_strings(submission, ("id", "predicted"), "submission")
        labels = read_csv_strings(truth, ("id", "segmentation"), "truth")
        catalog = scan_lgg(root, "test")
        if catalog.empty:
            raise DataError(
                f"no test images under {Path(root) / 'test'}: slice shapes and order come from there"
            )
        dup = sub["id"][sub["id"].duplicated()]
        if len(dup):
            raise SubmissionError(f"{submission}: id {dup.iloc[0]} appears twice")
        missing = sorted(set(labels["id"]) - set(sub["id"]))
        extra = sorted(set(sub["id"]) - set(labels["id"]))
        if missing or extra:
            raise SubmissionError(
                f"{submission}: {len(missing)} truth ids have no row (first {missing[:1]}), "
                f"{len(extra)} rows are not in the truth (first {extra[:1]})"
            )
        unknown = sorted(set(labels["id"]) - set(catalog["id"]))
        if unknown:
            raise DataError(
                f"{truth}: {len(unknown)} ids have no image under {Path(root) / 'test'} (first {unknown[0]})"
            )
        predicted, segmentation = (
            dict(zip(sub["id"], sub["predicted"])),
            dict(zip(labels["id"], labels["segmentation"])),
        )
        stats = []
        for _, rows in catalog[catalog["id"].isin(segmentation)].groupby("volume_id", sort=False):
            shape = (int(rows["height"].iloc[0]), int(rows["width"].iloc[0]))
            pred = np.stack(
                [_decode(predicted[i], shape, f"{submission} ({i})", SubmissionError) for i in rows["id"]]
            )
            true = np.stack(
                [_decode(segmentation[i], shape, f"{truth} ({i})", DataError) for i in rows["id"]]
            )
            stats.append(lgg_stats(pred[:, None], true[:, None]))
        return lgg_aggregate(stats)

    def phantom(self) -> Phantom:
        from pipeline.data import phantom_lgg

        return Phantom(phantom_lgg.PRESETS, phantom_lgg.generate_lgg, phantom_lgg.format_stats)


DATASET = LGG()
