"""UW-Madison GI Tract Image Segmentation: 16-bit abdominal MRI, three overlapping organ masks.

Layout: ``train/case{N}/case{N}_day{D}/scans/slice_{NNNN}_{W}_{H}_{PX}_{PY}.png`` (one 16-bit slice;
its id is ``case{N}_day{D}_slice_{NNNN}``), ``train.csv`` with three rows per slice
(``id,class,segmentation``, row-major RLE or blank), ``test/`` in the same shape (empty on the
public page), ``sample_submission.csv`` (``id,class,predicted``).

Group = case (one patient's days never span two folds); volume = day (``case{N}_day{D}``, the
unit of 2.5D stacks, 3D components and the 3D Hausdorff). Metric: ``0.4 * Dice + 0.6 * (1 -
3D Hausdorff)`` (:mod:`pipeline.datasets.uwmgi_metric`). Files: :mod:`pipeline.datasets.uwmgi_files`;
submissions: :mod:`pipeline.datasets.uwmgi_submission`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.data.stats import DataStats
from pipeline.datasets import uwmgi_metric, uwmgi_submission
from pipeline.datasets.base import DatasetSpec, Encoder, Phantom, SubmissionWriter
from pipeline.datasets.uwmgi_files import (
    CLASSES,
    decode_masks,
    describe_labels,
    load_split,
    read_slice,
    scan_split,
)
from pipeline.errors import DataError


class UWMadison(DatasetSpec):
    """The UW-Madison plug-in: a multi-class volumetric dataset whose labels are one CSV of RLE strings.

    A plug-in author copying it fills in, in order:

    - declarations: three classes, one channel, ``volumetric`` (days are 3D stacks), row-major RLE,
      ``labels_file`` (train.csv: the volume cache is rebuilt when it changes), ``cuts_to_box`` (its
      metric is unchanged on a volume cut to the box of its foreground, so tuning scores only that),
      the Kaggle competition, and ``config_defaults`` (two days with faulty labels left out of the
      folds; bowel labels that stop before the organ read as missing, not empty, when training
      segmenters);
    - layout: :meth:`scan` lists the PNG slices, :meth:`load_split` joins train.csv's labels,
      :meth:`presence` reads a class as present where its RLE is not blank;
    - images: :meth:`read_image` one 16-bit PNG, :meth:`read_masks` decodes a day's RLE columns;
    - metric: :meth:`volume_stats` the Dice rows and Hausdorff distances of a day, :meth:`fast_stats`
      without the per-class distances (validation, tuning), :meth:`reference` digests a truth once;
    - submission: the rows of ``sample_submission.csv`` (:mod:`~pipeline.datasets.uwmgi_submission`);
    - phantom and statistics: the synthetic abdomen of ``make data``; the label figures of
      ``make data-stats`` (from train.csv alone).
    """

    name: ClassVar[str] = "uwmgi"
    title: ClassVar[str] = "UW-Madison GI Tract"
    classes: ClassVar[tuple[str, ...]] = CLASSES
    channels: ClassVar[int] = 1
    volumetric: ClassVar[bool] = True
    cuts_to_box: ClassVar[bool] = True  # Dice rows empty in both are skipped; distances scale by the grid
    rle_order: ClassVar[str] = "C"
    labels_file: ClassVar[str | None] = "train.csv"
    kaggle_source: ClassVar[tuple[str, str]] = ("competition", "uw-madison-gi-tract-image-segmentation")
    metric_keys: ClassVar[tuple[str, ...]] = ("score", "dice", "hausdorff")
    # the schema's defaults were written for this dataset; its real labels are faulty in two days, and
    # where annotators stopped early it is the bowel that is cut short: the segmenters ignore those
    # labels (data.missing_labels; README), the classifier keeps reading them as empty
    config_defaults: ClassVar[dict[str, Any]] = {
        "folds": {"exclude_volumes": ["case7_day0", "case81_day30"]},
        "cls": {"data": {"missing_classes": ["large_bowel", "small_bowel"]}},
        "seg": {"data": {"missing_classes": ["large_bowel", "small_bowel"], "missing_labels": "ignore"}},
    }

    # ------------------------------------------------------------------ layout

    def scan(self, root: Path, split: str = "train") -> pd.DataFrame:
        return scan_split(root, split)

    def load_split(self, root: Path, split: str = "train") -> pd.DataFrame:
        return self.check_volumes(load_split(root, split))

    def has_labels(self, catalog: pd.DataFrame) -> bool:
        return all(name in catalog.columns for name in CLASSES)

    def presence(self, catalog: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in CLASSES if c not in catalog.columns]
        if missing:
            raise DataError(f"the catalog has no label columns {missing}: training needs train.csv labels")
        rles = catalog.set_index("id")[list(CLASSES)].astype(str)
        return rles.apply(lambda col: col.str.len() > 0)

    # ------------------------------------------------------------------ images

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray:
        return read_slice(path, width, height)

    def read_masks(self, rows: pd.DataFrame) -> np.ndarray:
        return decode_masks(rows)

    # ------------------------------------------------------------------ metric

    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> uwmgi_metric.VolumeStats:
        return uwmgi_metric.volume_stats(pred, truth, per_class=True)

    def fast_stats(
        self, pred: np.ndarray, truth: Any, grid: tuple[int, int, int] | None = None
    ) -> uwmgi_metric.VolumeStats:
        """The stats without the per-class distances (validation during training, tuning)."""
        return uwmgi_metric.volume_stats(pred, truth, per_class=False, grid=grid)

    def reference(self, truth: np.ndarray) -> uwmgi_metric.Reference:
        return uwmgi_metric.reference(truth)

    def aggregate(self, stats: Any) -> dict:
        return uwmgi_metric.aggregate(stats, CLASSES)

    def format_score(self, result: dict) -> str:
        def cell(value: float | None) -> str:
            return "      -" if value is None else f"{value:7.4f}"

        lines = [f"{'':12s} {'dice':>7s} {'hausd.':>7s} {'score':>7s}"]
        for name in CLASSES:
            row = result["per_class"][name]
            lines.append(f"{name:12s} {cell(row['dice'])} {cell(row['hausdorff'])} {cell(row['score'])}")
        lines.append(
            f"{'all':12s} {cell(result['dice'])} {cell(result['hausdorff'])} {cell(result['score'])}"
        )
        lines.append(f"({result['n_rows']} Dice rows, {result['n_volumes']} volumes in the Hausdorff mean)")
        return "\n".join(lines)

    # ------------------------------------------------------------------ submission

    def prediction_catalog(self, root: Path, debug_volumes: int = 0) -> pd.DataFrame:
        if debug_volumes > 0:
            return super().prediction_catalog(root, debug_volumes)
        return self.check_volumes(uwmgi_submission.test_catalog(root))

    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:
        return uwmgi_submission.UWSubmissionWriter(root, out, catalog, encode)

    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:
        return uwmgi_submission.score_files(submission, truth, root)

    # ------------------------------------------------------------------ phantom and statistics

    def phantom(self) -> Phantom:
        from pipeline.phantoms import uwmgi as uwmgi_phantom

        return Phantom(uwmgi_phantom.PRESETS, uwmgi_phantom.generate_dataset, uwmgi_phantom.format_stats)

    def describe_folder(self, root: Path) -> DataStats:
        return describe_labels(Path(root))


DATASET = UWMadison()
