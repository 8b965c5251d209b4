"""What a dataset folder looks like in numbers, real or phantom, so the two can be set side by side.

:func:`dataset_stats` reads a ``DATA_DIR`` through the dataset's own readers (the spec is handed in)
and returns named rows of figures; :func:`format_table` prints one column per folder. The phantoms
are calibrated against these rows on the real development folders.

Each dataset's figures live beside its plug-in (``pipeline.datasets.lgg_figures``,
``nerve_figures``, ``uwmgi_files.describe_labels``); this module holds the table they fill
(:class:`DataStats`), the percentile helper and the mask figures they share (:func:`mask_geometry`,
:func:`ring_contrast`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import pandas as pd

from pipeline.errors import DataError

log = logging.getLogger(__name__)

RING_PX = (5, 20)  # the ring around a mask (a nerve): from 5 to 20 px outside its outline


class Describer(Protocol):
    """The part of a dataset spec (:mod:`pipeline.datasets`) that describes a folder."""

    def describe_folder(self, root: Path) -> DataStats: ...


class Reader(Protocol):
    """The parts of a dataset spec (pipeline.datasets) the statistics read through."""

    @property
    def name(self) -> str: ...

    @property
    def rle_order(self) -> str: ...

    def load_split(self, root: Path, split: str = "train") -> pd.DataFrame: ...

    def read_volume(self, rows: pd.DataFrame, with_masks: bool | None = None) -> Any: ...

    def read_image(self, path: str | Path, height: int, width: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Stat:
    """One row: a label, its figures and how they print (``int``, ``float`` or ``share``)."""

    label: str
    values: tuple[float, ...]
    kind: str = "int"
    sep: str = " / "

    def text(self) -> str:
        def one(v: float) -> str:
            if v is None or not np.isfinite(v):
                return "-"
            return {"int": f"{v:,.0f}", "float": f"{v:.2f}", "share": f"{v:.1%}"}[self.kind]

        return self.sep.join(one(v) for v in self.values)


@dataclass
class DataStats:
    """The statistics of one folder: its dataset, its root and the rows in print order."""

    dataset: str
    root: Path
    rows: list[Stat] = field(default_factory=list)

    def add(self, label: str, values: Sequence[float], kind: str = "int", sep: str = " / ") -> None:
        self.rows.append(Stat(label, tuple(float(v) for v in values), kind, sep))

    def value(self, label: str) -> tuple[float, ...]:
        """The figures of the row whose label starts with ``label``."""
        for row in self.rows:
            if row.label.startswith(label):
                return row.values
        raise KeyError(f"no row '{label}' in the {self.dataset} statistics of {self.root}")


def pct(values: Sequence[float] | np.ndarray, qs: Sequence[float]) -> list[float]:
    """Percentiles ``qs`` (0-100) of ``values``; NaN for each when there are none."""
    array = np.asarray(values, dtype=np.float64)
    return np.percentile(array, qs).tolist() if array.size else [np.nan] * len(qs)


# --------------------------------------------------------------------------- mask figures


def mask_geometry(masks: np.ndarray) -> np.ndarray:
    """(N, 5) float: area, box height, box width, centre row, centre column of (N, H, W) masks."""
    out = np.zeros((len(masks), 5))
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        r, c = np.nonzero(mask)
        out[i] = (len(r), rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1, r.mean(), c.mean())
    return out


def ring_contrast(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The nerve's mean / the mean of a ring around it, and (nerve - ring) / the ring's std."""
    m = mask.astype(np.uint8)
    near = cv2.dilate(m, np.ones((2 * RING_PX[0] + 1,) * 2, np.uint8)) > 0
    far = cv2.dilate(m, np.ones((2 * RING_PX[1] + 1,) * 2, np.uint8)) > 0
    inside, ring = image[m > 0].astype(np.float64), image[far & ~near].astype(np.float64)
    return inside.mean() / max(ring.mean(), 1.0), (inside.mean() - ring.mean()) / max(ring.std(), 1.0)


# --------------------------------------------------------------------------- entry and printing


def dataset_stats(spec: Describer, root: Path | str) -> DataStats:
    """The statistics of the dataset folder ``root``: the figures its dataset plug-in ``spec`` gives."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root} (set DATA_DIR or pass --data-dir)")
    return spec.describe_folder(root)


def format_table(tables: Sequence[DataStats], names: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per statistic, one column per folder (headed by ``names``)."""
    names = list(names) if names else [str(t.root) for t in tables]
    labels = list(dict.fromkeys(row.label for t in tables for row in t.rows))
    cells = [[next((r.text() for r in t.rows if r.label == label), "") for t in tables] for label in labels]
    width = max(len(x) for x in [*labels, "statistic"])
    widths = [max(len(x) for x in [name, *(row[i] for row in cells)]) for i, name in enumerate(names)]
    lines = ["  ".join(["statistic".ljust(width), *(n.rjust(w) for n, w in zip(names, widths))])]
    lines.append("  ".join("-" * w for w in [width, *widths]))
    for label, row in zip(labels, cells):
        lines.append("  ".join([label.ljust(width), *(c.rjust(w) for c, w in zip(row, widths))]))
    return "\n".join(lines)
