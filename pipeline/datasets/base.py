"""The dataset contract: what a dataset plug-in declares and the methods its author writes.

A dataset module defines one :class:`DatasetSpec` subclass and an instance ``DATASET``; the rest of the
pipeline is handed that spec and never names a dataset. The class is checked when it is defined (its
declarations, and that every abstract method is written), so a plug-in with a gap fails at import, not
an hour into training. The parts, in the order an author fills them in:

- **declarations** (class attributes, :data:`DECLARATIONS`): ``name``, ``title``, ``classes``,
  ``channels`` (per slice: LGG's three MR contrasts), ``volumetric`` (slices form a 3D stack: 2.5D
  input, z-continuity and 3D components make sense), ``rle_order`` ("C" row-major or "F"
  column-major), ``labels_file`` (its size/mtime invalidate the volume cache), ``metric_keys``,
  ``cuts_to_box``, ``config_defaults[stage]`` (a config delta under every config of that stage),
  ``kaggle_source``, ``train_folder``, ``truth_file``.
- **layout**: :meth:`~DatasetSpec.scan` turns a split folder into a *catalog*, one row per image with
  the columns of :data:`~pipeline.datasets.common.CATALOG_COLUMNS` (plus the dataset's label columns): ``id``; ``group`` (folds
  never split a group); ``volume_id`` (the unit of 2.5D neighbours, 3D post-processing and volumetric
  metrics; a 2D dataset uses it only to batch images); ``slice`` (order inside the volume); ``path``;
  ``height``/``width``; ``px``/``py`` spacing. :meth:`has_labels` and :meth:`presence` (which classes
  a slice holds: folds, classifier targets).
- **images**: :meth:`read_image` gives ``(H, W)``, or ``(C, H, W)`` when ``channels`` > 1;
  :meth:`read_masks` a volume's ``(S, classes, H, W)`` uint8 masks.
- **metric**: :meth:`volume_stats` is what one volume adds, :meth:`aggregate` sums those into a dict
  whose ``score`` is the number tuning maximises.
- **submission**: :meth:`submission_writer` writes the competition's file(s) volume by volume,
  :meth:`score_files` scores a written submission against the phantom's hidden answers.
- **phantom**: :meth:`phantom`, the synthetic folder ``make data`` writes in the dataset's layout.

The other methods have defaults that serve most datasets (reading a volume, validation stats,
the debug catalog, the statistics of ``make data-stats``); override them where yours differs.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import SCHEMAS
from pipeline.data.stats import DataStats
from pipeline.data.volumes import Volume
from pipeline.datasets.common import check_one_size, check_slices
from pipeline.errors import DataError

log = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray, str], list[str]]  # (N, H, W) masks, RLE order -> strings
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
KAGGLE_KINDS = ("competition", "dataset")


class Phantom(NamedTuple):
    """A dataset's embedded synthetic phantom: presets, ``generate(out, preset, seed, workers, force)``, stats text."""

    PRESETS: Mapping[str, Any]
    generate: Callable[..., dict]
    format_stats: Callable[[dict], str]


class SubmissionWriter(abc.ABC):
    """Collects a dataset's predicted masks volume by volume, then writes and checks the files."""

    @abc.abstractmethod
    def add(self, volume: Volume, masks: np.ndarray) -> None:
        """Take one volume's (S, classes, H, W) bool masks."""

    @abc.abstractmethod
    def finish(self) -> Path:
        """Write the submission (atomically, checked) and return its path."""


class ContractError(TypeError):
    """A dataset plug-in class breaks the contract; raised when the class is defined."""


def _names(value: Any) -> bool:
    """A non-empty tuple of distinct non-empty strings."""
    return (
        isinstance(value, tuple)
        and len(value) > 0
        and all(isinstance(v, str) and v for v in value)
        and len(set(value)) == len(value)
    )


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


# the declarations of a spec: (class attribute, check of its value, what it must be)
DECLARATIONS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("name", lambda v: isinstance(v, str) and bool(NAME_RE.match(v)), "a lower-case identifier (DATASET=)"),
    ("title", _text, "a non-empty string"),
    ("classes", _names, "a tuple of distinct class names"),
    ("channels", lambda v: type(v) is int and v >= 1, "an int >= 1"),
    ("volumetric", lambda v: isinstance(v, bool), "True or False"),
    ("rle_order", lambda v: v in ("C", "F"), "'C' (row-major) or 'F' (column-major)"),
    ("labels_file", lambda v: v is None or _text(v), "None or a file name"),
    ("metric_keys", lambda v: _names(v) and v[0] == "score", "a tuple of metric names, 'score' first"),
    ("cuts_to_box", lambda v: isinstance(v, bool), "True or False"),
    (
        "config_defaults",
        lambda v: (
            isinstance(v, Mapping)
            and set(v) <= set(SCHEMAS)
            and all(isinstance(d, Mapping) for d in v.values())
        ),
        f"{{stage: config delta}} with stages among {sorted(SCHEMAS)}",
    ),
    (
        "kaggle_source",
        lambda v: isinstance(v, tuple) and len(v) == 2 and v[0] in KAGGLE_KINDS and isinstance(v[1], str),
        f"(kind, slug) with kind one of {KAGGLE_KINDS}",
    ),
    ("train_folder", _text, "a folder name"),
    ("truth_file", _text, "a file name"),
)


def check_declarations(cls: type) -> None:
    """Raise :class:`ContractError` naming the first class attribute of a dataset spec that is wrong."""
    for key, ok, want in DECLARATIONS:
        if not ok(getattr(cls, key, None)):
            raise ContractError(
                f"dataset plug-in {cls.__module__}.{cls.__qualname__}: {key} = {getattr(cls, key, None)!r} "
                f"must be {want} (see pipeline/datasets/base.py)"
            )


class DatasetSpec(abc.ABC):
    """A dataset plug-in (see the module doc): fill in the declarations and the abstract methods.

    A subclass that is itself a base for other plug-ins says so: ``class TiffSpec(DatasetSpec,
    abstract=True)``; every other subclass is checked when it is defined.
    """

    # ------------------------------------------------------------------ declarations
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    channels: ClassVar[int] = 1
    volumetric: ClassVar[bool] = True
    rle_order: ClassVar[str] = "C"
    labels_file: ClassVar[str | None] = None
    metric_keys: ClassVar[tuple[str, ...]] = ("score",)
    # the metric of a volume is unchanged when it is cut to a box holding every predicted and true
    # voxel (with the uncut grid passed to fast_stats): tuning then scores only that box
    cuts_to_box: ClassVar[bool] = False
    # the channel a dropped one is replaced by (data.channel_dropout); None: the dataset has none
    fill_channel: ClassVar[int | None] = None
    config_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    kaggle_source: ClassVar[tuple[str, str]] = ("competition", "")  # (competition|dataset, slug)
    train_folder: ClassVar[str] = "train"
    truth_file: ClassVar[str] = "test_labels.csv"  # the phantom's hidden answers, kept apart

    def __init_subclass__(cls, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if abstract:
            return
        missing = sorted(
            name for name in dir(cls) if getattr(getattr(cls, name, None), "__isabstractmethod__", False)
        )
        if missing:
            raise ContractError(
                f"dataset plug-in {cls.__module__}.{cls.__qualname__} does not write {', '.join(missing)} "
                "(the abstract methods of pipeline.datasets.base.DatasetSpec); write them, or declare the "
                "class a base with `abstract=True`"
            )
        check_declarations(cls)

    # ------------------------------------------------------------------ layout

    @abc.abstractmethod
    def scan(self, root: Path, split: str = "train") -> pd.DataFrame:
        """The catalog of ``root/<split>`` (``CATALOG_COLUMNS`` + label columns); empty when absent."""

    @abc.abstractmethod
    def has_labels(self, catalog: pd.DataFrame) -> bool:
        """Does the catalog carry the labels (:meth:`read_masks` and :meth:`presence` can run)."""

    @abc.abstractmethod
    def presence(self, catalog: pd.DataFrame) -> pd.DataFrame:
        """Per id (index), one bool column per class: does the slice hold that class."""

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
        (:func:`~pipeline.datasets.common.check_slices`); 2D datasets pass as they are."""
        if self.volumetric:
            check_slices(catalog)
        return catalog

    def presence_of(self, catalog: pd.DataFrame, ids: Sequence[str]) -> np.ndarray:
        """(len(ids), classes) bool presence of the slices ``ids``."""
        return self.presence(catalog).loc[list(ids)].to_numpy(dtype=bool)

    # ------------------------------------------------------------------ images

    @abc.abstractmethod
    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray:
        """One image as (H, W), or (C, H, W) when ``channels`` > 1; its size checked against the catalog."""

    @abc.abstractmethod
    def read_masks(self, rows: pd.DataFrame) -> np.ndarray:
        """(S, classes, H, W) uint8 masks of one volume's rows (in slice order)."""

    def read_volume(self, rows: pd.DataFrame, with_masks: bool | None = None) -> Volume:
        """One volume straight from its files (``rows``: that volume's catalog rows, any order)."""
        rows = rows.sort_values("slice", kind="stable")
        height, width = check_one_size(rows)
        image = np.stack([self.read_image(p, height, width) for p in rows["path"]])
        labelled = self.has_labels(rows) if with_masks is None else with_masks
        mask = self.read_masks(rows) if labelled else None
        spacing = (float(rows["py"].iloc[0]), float(rows["px"].iloc[0]))
        return Volume(str(rows["volume_id"].iloc[0]), list(rows["id"]), image, mask, spacing)

    # ------------------------------------------------------------------ metric

    @abc.abstractmethod
    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> Any:
        """What one volume's (S, classes, H, W) prediction adds to the score (bool or uint8 masks)."""

    @abc.abstractmethod
    def aggregate(self, stats: Sequence[Any]) -> dict:
        """The metric dict (``score`` first, ``per_class`` {class: {"score": ...}}) of per-volume stats."""

    def fast_stats(self, pred: np.ndarray, truth: Any, grid: tuple[int, int, int] | None = None) -> Any:
        """The stats for validation and tuning (a dataset may skip analysis-only parts).

        ``truth`` is a mask or its :meth:`reference`; ``grid`` the uncut (S, H, W) of a volume cut to
        a box (only where ``cuts_to_box``).
        """
        return self.volume_stats(pred, truth)

    def reference(self, truth: np.ndarray) -> Any:
        """The truth as :meth:`fast_stats` takes it, digested once for many predictions (default: as is)."""
        return truth

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

    @abc.abstractmethod
    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:
        """The writer of ``out`` for the images of ``catalog``; ``force`` skips the sanity refusals."""

    @abc.abstractmethod
    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:
        """Score a written submission against the hidden answers (``truth_file``), as :meth:`aggregate`."""

    def prediction_catalog(self, root: Path, debug_volumes: int = 0) -> pd.DataFrame:
        """The images ``make submit`` predicts: the test split, or the first train volumes when debugging.

        A debug catalog carries a ``debug`` column, so writers use its own ids, not sample_submission's.
        """
        root = Path(root)
        if debug_volumes > 0:
            train = self.scan(root, "train")
            if train.empty:
                raise DataError(
                    f"debug_train_volumes={debug_volumes} but {root / self.train_folder} has no images"
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

    # ------------------------------------------------------------------ phantom and statistics

    @abc.abstractmethod
    def phantom(self) -> Phantom:
        """How ``make data`` writes this dataset's synthetic phantom (import it here, lazily)."""

    def describe_folder(self, root: Path) -> DataStats:
        """The figures ``make data-stats`` prints for a data folder, real or phantom, to set them side by side.

        The default counts groups, volumes and images and the share of images holding each class;
        a dataset whose phantom is calibrated against real statistics gives its own figures.
        """
        catalog = self.load_split(Path(root), "train")
        presence = self.presence(catalog)
        stats = DataStats(self.name, Path(root))
        counts = [catalog["group"].nunique(), catalog["volume_id"].nunique(), len(catalog)]
        stats.add("groups / volumes / images", counts)
        stats.add("images with any class", [presence.any(axis=1).mean()], "share")
        for name in self.classes:
            stats.add(f"{name}: share of images", [presence[name].mean()], "share")
        return stats

    def __repr__(self) -> str:
        return f"<dataset {self.name}: {len(self.classes)} classes, {self.channels} channel(s)>"
