"""What a dataset plug-in declares, and the parts every dataset shares.

A dataset module (``pipeline/datasets/<name>.py``) defines one :class:`DatasetSpec` subclass and
an instance ``DATASET``. The rest of the pipeline asks the spec and never names a dataset:

- **layout**: :meth:`~DatasetSpec.scan` turns a split folder into a *catalog*, one row per image
  with the columns of :data:`CATALOG_COLUMNS` (plus the dataset's label columns): ``id``;
  ``group`` (folds never split a group); ``volume_id`` (the unit of 2.5D neighbours, 3D
  post-processing and volumetric metrics; a 2D dataset uses it only to batch images);
  ``slice`` (order inside the volume); ``path``; ``height``/``width``; ``px``/``py`` spacing.
- **images and labels**: :meth:`read_image` gives ``(H, W)`` or ``(C, H, W)`` for ``channels``
  > 1; :meth:`read_masks` gives a volume's ``(S, classes, H, W)`` uint8 masks;
  :meth:`presence` which classes a slice holds (folds, classifier targets).
- **metric**: :meth:`volume_stats` is what one volume adds, :meth:`aggregate` sums those into a
  dict whose ``score`` is the number tuning maximises; ``metric_keys`` are shown in tables.
- **submission**: :meth:`prediction_catalog` lists what to predict, :meth:`submission_writer`
  writes the file(s) in the competition's format, :meth:`score_files` scores them.
- **defaults**: ``config_defaults[stage]`` is a config delta applied under every config of that
  stage for the dataset (``data.k``, ``data.crop``, excluded volumes...); the file may override it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd

from pipeline.data.volumes import Volume
from pipeline.errors import DataError
from pipeline.rle import RLEError, rle_decode

log = logging.getLogger(__name__)

CATALOG_COLUMNS = ["id", "group", "volume_id", "slice", "path", "height", "width", "px", "py"]
Encoder = Callable[[np.ndarray, str], list[str]]  # (N, H, W) masks, RLE order -> strings


class Phantom(NamedTuple):
    """A dataset's embedded synthetic phantom: presets, ``generate(out, preset, seed, workers, force)``, stats text."""

    PRESETS: Mapping[str, Any]
    generate: Callable[..., dict]
    format_stats: Callable[[dict], str]


class SubmissionWriter:
    """Collects a dataset's predicted masks volume by volume, then writes and checks the files."""

    def add(self, volume: Volume, masks: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> Path:  # pragma: no cover - interface
        raise NotImplementedError


class DatasetSpec:
    """A dataset plug-in (see the module doc). Subclasses fill in the class attributes and methods."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    channels: ClassVar[int] = 1
    volumetric: ClassVar[bool] = True  # slices of a volume form a 3D stack
    rle_order: ClassVar[str] = "C"
    labels_file: ClassVar[str | None] = None  # its size/mtime invalidate the decoded cache
    metric_keys: ClassVar[tuple[str, ...]] = ("score",)
    # the metric of a volume is unchanged when it is cut to a box holding every predicted and true
    # voxel (with the uncut grid passed to fast_stats): tuning then scores only that box
    cuts_to_box: ClassVar[bool] = False
    config_defaults: ClassVar[Mapping[str, Any]] = {}
    truth_file: ClassVar[str] = "test_labels.csv"  # the phantom's hidden answers, kept apart
    kaggle_source: ClassVar[tuple[str, str]] = (
        "competition",
        "",
    )  # (competition|dataset, slug) of the real data

    # ------------------------------------------------------------------ layout

    def scan(self, root: Path, split: str = "train") -> pd.DataFrame:  # pragma: no cover - interface
        raise NotImplementedError

    def load_split(self, root: Path, split: str = "train") -> pd.DataFrame:
        """The catalog of a split with its labels; the train split must have images and labels."""
        catalog = self.scan(Path(root), split)
        if split == "train" and catalog.empty:
            raise DataError(
                f"no {self.title} images under {Path(root) / self.train_folder} "
                f"(run `make data DATASET={self.name}`, or point DATA_DIR at the Kaggle download)"
            )
        return self.check_volumes(catalog)

    def check_volumes(self, catalog: pd.DataFrame) -> pd.DataFrame:
        """The catalog, once every volume of a ``volumetric`` dataset holds its slices 1..N
        (:func:`check_slices`); 2D datasets pass as they are."""
        if self.volumetric:
            check_slices(catalog)
        return catalog

    train_folder: ClassVar[str] = "train"

    def has_labels(self, catalog: pd.DataFrame) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def presence(self, catalog: pd.DataFrame) -> pd.DataFrame:  # pragma: no cover - interface
        """Per id (index), one bool column per class: does the slice hold that class."""
        raise NotImplementedError

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def read_masks(self, rows: pd.DataFrame) -> np.ndarray:  # pragma: no cover - interface
        """(S, classes, H, W) uint8 masks of one volume's rows (in slice order)."""
        raise NotImplementedError

    def read_volume(self, rows: pd.DataFrame, with_masks: bool | None = None) -> Volume:
        """One volume straight from its files (``rows``: that volume's catalog rows, any order)."""
        rows = rows.sort_values("slice", kind="stable")
        height, width = check_one_size(rows)
        image = np.stack([self.read_image(p, height, width) for p in rows["path"]])
        labelled = self.has_labels(rows) if with_masks is None else with_masks
        mask = self.read_masks(rows) if labelled else None
        spacing = (float(rows["py"].iloc[0]), float(rows["px"].iloc[0]))
        return Volume(str(rows["volume_id"].iloc[0]), list(rows["id"]), image, mask, spacing)

    def presence_of(self, catalog: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), classes) bool presence of the slices ``ids``."""
        return self.presence(catalog).loc[list(ids)].to_numpy(dtype=bool)

    # ------------------------------------------------------------------ metric

    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> Any:  # pragma: no cover - interface
        """What one volume's (S, classes, H, W) prediction adds to the score (bool or uint8 masks)."""
        raise NotImplementedError

    def fast_stats(self, pred: np.ndarray, truth: Any, grid: tuple[int, int, int] | None = None) -> Any:
        """The stats for validation and tuning (a dataset may skip analysis-only parts).

        ``truth`` is a mask or its :meth:`reference`; ``grid`` the uncut (S, H, W) of a volume cut to
        a box (only where ``cuts_to_box``).
        """
        return self.volume_stats(pred, truth)

    def reference(self, truth: np.ndarray) -> Any:
        """The truth as :meth:`fast_stats` takes it, digested once for many predictions (default: as is)."""
        return truth

    def aggregate(self, stats: Sequence[Any]) -> dict:  # pragma: no cover - interface
        """The metric dict (``score`` first, ``per_class`` {class: {"score": ...}}) of per-volume stats."""
        raise NotImplementedError

    def format_score(self, result: dict) -> str:
        """A short human table of a metric dict."""
        lines = [f"{key:>14s} {result[key]:.4f}" for key in self.metric_keys if result.get(key) is not None]
        per_class = result.get("per_class") or {}
        if len(self.classes) > 1:
            lines += [
                f"{name:>14s} {row['score']:.4f}"
                for name, row in per_class.items()
                if row.get("score") is not None
            ]
        return "\n".join(lines)

    # ------------------------------------------------------------------ submission

    def prediction_catalog(self, root: Path, debug_volumes: int = 0) -> pd.DataFrame:
        """The images ``make submit`` predicts: the test split, or the first train volumes when debugging.

        A debug catalog carries a ``debug`` column, so writers use its own ids, not sample_submission's.
        """
        root = Path(root)
        if debug_volumes > 0:
            train = self.scan(root, "train")
            if train.empty:
                raise DataError(
                    f"debug_train_days={debug_volumes} but {root / self.train_folder} has no images"
                )
            keep = list(dict.fromkeys(train["volume_id"]))[:debug_volumes]
            catalog = train[train["volume_id"].isin(keep)].reset_index(drop=True)
            log.info(
                "debug: predicting %d train volumes (%d images) instead of the test set",
                len(keep),
                len(catalog),
            )
            return self.check_volumes(catalog).assign(debug=True)
        return self.check_volumes(self.scan(root, "test"))

    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:  # pragma: no cover - interface
        raise NotImplementedError

    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:  # pragma: no cover
        """Score a written submission against the hidden answers (``truth_file``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the embedded phantom

    def phantom(self) -> Phantom:  # pragma: no cover - interface
        """How ``make data`` writes this dataset's synthetic phantom."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<dataset {self.name}: {len(self.classes)} classes, {self.channels} channel(s)>"


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
