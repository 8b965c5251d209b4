"""A fourth dataset written only here: the proof that a plug-in outside ``pipeline/datasets`` runs every stage.

"Toy shapes": 8-bit grayscale volumes of a few 24x28 slices holding a bright square and a dim disc,
each over a run of slices (two overlapping classes, volumetric, column-major RLE: a combination no
built-in dataset has). Its own layout, reader, metric, submission and phantom:

- ``train/p<G>/s<V>/<k>.npy`` one slice (uint8 (H, W)) and ``<k>.mask.npy`` its masks (uint8 (2, H, W));
  ``test/`` the same without masks, the answers kept apart in ``test_labels.csv`` (``id,square,disc``);
- id ``p<G>_s<V>_<k>``, group ``p<G>`` (a patient), volume ``p<G>_s<V>`` (a scan), slice ``k`` from 1;
- metric: the mean over classes of the mean per-scan volumetric Dice (scans empty in both skipped);
- submission: ``id,square,disc`` (column-major RLE) in catalog order.

Importing the module registers it (``tests/conftest.py`` does), so every test parametrized over the
registry runs it too; its configs are ``tests/configs/toy_demo_*.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from pipeline.data.volumes import Volume
from pipeline.datasets import register
from pipeline.datasets.base import DatasetSpec, Encoder, Phantom, SubmissionWriter
from pipeline.datasets.common import (
    CATALOG_COLUMNS,
    check_submission_rows,
    decode_rle,
    read_csv_strings,
    sort_catalog,
    volume_shape,
)
from pipeline.errors import DataError, SubmissionError
from pipeline.io import write_csv, write_json
from pipeline.phantoms.common import resolve_preset, write_dataset_folder
from pipeline.rle import rle_encode_numpy

CLASSES = ("square", "disc")
PRESETS = {"tiny": {"train": 6, "test": 2, "scans": 1, "slices": 6, "shape": (24, 28)}}


# --------------------------------------------------------------------------- layout and images


def scan_toy(root: Path, split: str) -> pd.DataFrame:
    """The slices of ``root/split`` (``p<G>/s<V>/<k>.npy``), with the class presence read from the masks."""
    base = Path(root) / split
    rows = []
    for path in sorted(base.glob("p*/s*/*.npy")) if base.is_dir() else []:
        if path.name.endswith(".mask.npy"):
            continue
        group, scan = path.parent.parent.name, path.parent.name
        height, width = np.load(path, mmap_mode="r").shape
        rows.append((f"{group}_{scan}_{path.stem}", group, f"{group}_{scan}", int(path.stem), str(path),
                     height, width, 1.0, 1.0))  # fmt: skip
    catalog = sort_catalog(pd.DataFrame(rows, columns=CATALOG_COLUMNS), base)
    if split == "train" and not catalog.empty:
        present = np.stack([_mask(p).any(axis=(1, 2)) for p in catalog["path"]])
        catalog[list(CLASSES)] = present
    return catalog


def _mask(image_path: str) -> np.ndarray:
    path = Path(image_path).with_suffix(".mask.npy")
    if not path.is_file():
        raise DataError(f"{image_path} has no mask: expected {path} beside it")
    return np.load(path)


def toy_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(classes,) volumetric Dice of one scan's (S, classes, H, W) masks; NaN where both are empty."""
    p, t = np.asarray(pred) != 0, np.asarray(truth) != 0
    inter = np.count_nonzero(p & t, axis=(0, 2, 3))
    total = np.count_nonzero(p, axis=(0, 2, 3)) + np.count_nonzero(t, axis=(0, 2, 3))
    return np.where(total == 0, np.nan, 2.0 * inter / np.maximum(total, 1))


def toy_aggregate(stats: Sequence[np.ndarray]) -> dict:
    """Per class the mean Dice over the scans holding it (1 when none does); the score their mean."""
    table = np.asarray(list(stats), dtype=np.float64).reshape(-1, len(CLASSES))
    per = [float(np.nanmean(col)) if np.isfinite(col).any() else 1.0 for col in table.T]
    return {"score": float(np.mean(per)), "per_class": {c: {"score": s} for c, s in zip(CLASSES, per)}}


def _decode(
    table: pd.DataFrame, shape: tuple[int, int], order: str, where: Path, error: type[ValueError]
) -> np.ndarray:
    """(S, classes, H, W) masks of the rows of ``table`` (one RLE column per class)."""
    return np.stack(
        [
            [decode_rle(rle, shape, order, f"{where} ({i}, {c})", error) for c, rle in zip(CLASSES, rles)]
            for i, *rles in table[["id", *CLASSES]].itertuples(index=False)
        ]
    )


class ToyWriter(SubmissionWriter):
    """``id,square,disc`` for every image of the catalog, in its order."""

    def __init__(self, out: Path, catalog: pd.DataFrame, encode: Encoder, order: str) -> None:
        self.out, self.ids, self.encode, self.order = Path(out), list(catalog["id"]), encode, order
        self.rows: dict[str, list[str]] = {}

    def add(self, volume: Volume, masks: np.ndarray) -> None:
        per_class = [self.encode(masks[:, c], self.order) for c in range(len(CLASSES))]
        self.rows.update(zip(volume.ids, map(list, zip(*per_class))))

    def finish(self) -> Path:
        missing = [i for i in self.ids if i not in self.rows]
        if missing:
            raise SubmissionError(
                f"{self.out}: {len(missing)} images were not predicted (first {missing[0]})"
            )
        frame = pd.DataFrame([[i, *self.rows[i]] for i in self.ids], columns=["id", *CLASSES])
        return write_csv(self.out, frame)


class Toy(DatasetSpec):
    """Toy shapes (see the module doc)."""

    name: ClassVar[str] = "toy"
    title: ClassVar[str] = "Toy shapes"
    classes: ClassVar[tuple[str, ...]] = CLASSES
    channels: ClassVar[int] = 1
    volumetric: ClassVar[bool] = True
    rle_order: ClassVar[str] = "F"
    metric_keys: ClassVar[tuple[str, ...]] = ("score",)
    kaggle_source: ClassVar[tuple[str, str]] = ("dataset", "example/toy-shapes")
    config_defaults: ClassVar[dict[str, Any]] = {
        stage: {"data": {"crop": False}} for stage in ("det", "cls", "seg")
    }

    def scan(self, root: Path, split: str = "train") -> pd.DataFrame:
        return scan_toy(root, split)

    def has_labels(self, catalog: pd.DataFrame) -> bool:
        return all(c in catalog.columns for c in CLASSES)

    def presence(self, catalog: pd.DataFrame) -> pd.DataFrame:
        if not self.has_labels(catalog):
            raise DataError("the toy catalog has no masks: only the train split has them")
        return catalog.set_index("id")[list(CLASSES)].astype(bool)

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray:
        image = np.load(path)
        if image.shape != (height, width):
            raise DataError(f"{path}: image is {image.shape}, expected {(height, width)}")
        return image

    def read_masks(self, rows: pd.DataFrame) -> np.ndarray:
        return np.stack([_mask(p) for p in rows["path"]]).astype(np.uint8)

    def volume_stats(self, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        return toy_dice(pred, truth)

    def aggregate(self, stats: Sequence[Any]) -> dict:
        return toy_aggregate(stats)

    def submission_writer(
        self, root: Path, out: Path, catalog: pd.DataFrame, encode: Encoder, force: bool = False
    ) -> SubmissionWriter:
        return ToyWriter(out, catalog, encode, self.rle_order)

    def score_files(self, submission: Path, truth: Path, root: Path) -> dict:
        sub = read_csv_strings(submission, ("id", *CLASSES), "submission").set_index("id", drop=False)
        answers = read_csv_strings(truth, ("id", *CLASSES), "truth").set_index("id", drop=False)
        check_submission_rows(sub, answers, "id", "ids", submission)
        stats = []
        for _, rows in self.scan(root, "test").groupby("volume_id", sort=False):
            shape, ids = volume_shape(rows), list(rows["id"])
            pred = _decode(sub.loc[ids], shape, self.rle_order, submission, SubmissionError)
            true = _decode(answers.loc[ids], shape, self.rle_order, truth, DataError)
            stats.append(toy_dice(pred, true))
        return toy_aggregate(stats)

    def phantom(self) -> Phantom:
        return Phantom(
            PRESETS, generate, lambda stats: f"train: {stats['train']} images, test: {stats['test']}"
        )


# --------------------------------------------------------------------------- the phantom


def _scan_masks(rng: np.random.Generator, n: int, shape: tuple[int, int]) -> np.ndarray:
    """(n, 2, H, W) masks: a square and a disc, each over a run of slices (sometimes absent)."""
    h, w = shape
    masks = np.zeros((n, len(CLASSES), h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for c in range(len(CLASSES)):
        if rng.random() < 0.2:
            continue
        first = int(rng.integers(0, n - 2))
        last = int(rng.integers(first + 1, n))
        size = int(rng.integers(5, 9))
        y, x = int(rng.integers(1, h - size - 1)), int(rng.integers(1, w - size - 1))
        shape_c = (
            (yy >= y) & (yy < y + size) & (xx >= x) & (xx < x + size)
            if c == 0
            else (yy - y - size / 2) ** 2 + (xx - x - size / 2) ** 2 <= (size / 2) ** 2
        )
        masks[first : last + 1, c] = shape_c
    return masks


def _write_split(
    out: Path, split: str, n_patients: int, first: int, preset: dict, rng: np.random.Generator
) -> list:
    """Write one split's scans; returns the test answers (id and one RLE per class) when ``split`` is test."""
    answers = []
    for g in range(first, first + n_patients):
        for v in range(1, preset["scans"] + 1):
            folder = out / split / f"p{g}" / f"s{v}"
            folder.mkdir(parents=True)
            masks = _scan_masks(rng, preset["slices"], preset["shape"])
            for k, mask in enumerate(masks, start=1):
                image = rng.normal(40, 8, preset["shape"]) + 160 * mask[0] + 80 * mask[1]
                np.save(folder / f"{k}.npy", np.clip(image, 0, 255).astype(np.uint8))
                if split == "train":
                    np.save(folder / f"{k}.mask.npy", mask)
                else:
                    answers.append([f"p{g}_s{v}_{k}", *(rle_encode_numpy(m, "F") for m in mask)])
    return answers


def generate(
    out: Path | str, preset: Any = "tiny", seed: int = 0, workers: int = 1, force: bool = False
) -> dict:
    """Write the toy set under ``out`` (atomically, never over real data); returns its counts."""
    chosen = resolve_preset(preset, PRESETS)
    spec = {"name": preset if isinstance(preset, str) else "custom", "seed": seed, "generator": 1}

    def write(tmp: Path) -> dict:
        rng = np.random.default_rng(seed)
        _write_split(tmp, "train", chosen["train"], 1, chosen, rng)
        answers = _write_split(tmp, "test", chosen["test"], chosen["train"] + 1, chosen, rng)
        write_csv(tmp / "test_labels.csv", pd.DataFrame(answers, columns=["id", *CLASSES]))
        per_split = chosen["scans"] * chosen["slices"]
        stats = {"train": chosen["train"] * per_split, "test": chosen["test"] * per_split}
        write_json(tmp / "dataset.json", {"spec": spec, "stats": stats})
        return stats

    return write_dataset_folder(out, spec, write, force=force, what="toy dataset")


DATASET = register(Toy())
