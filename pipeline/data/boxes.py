"""The crop boxes file: ``runs/det/<det_cfg>/boxes_<split>.csv``, one box per volume.

Columns ``volume_id, y0, x0, y1, x1, source`` (source is ``detector``, ``threshold`` or ``full``),
written by `make train-det` and read by every stage that crops. The crop/paste-back geometry
itself lives in :mod:`pipeline.data.geometry`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.geometry import Box
from pipeline.errors import DataError
from pipeline.io import write_csv
from pipeline.paths import run_dir

SOURCES = ("detector", "threshold", "full")
BOX_COLUMNS = ["volume_id", "y0", "x0", "y1", "x1", "source"]


def boxes_path(det_config_name: str, split: str = "train") -> Path:
    name = Path(det_config_name).stem if str(det_config_name).endswith((".yaml", ".yml")) else det_config_name
    return run_dir("det", name) / f"boxes_{split}.csv"


def write_boxes(path: Path, boxes: dict[str, tuple[Box, str]]) -> Path:
    rows = [{"volume_id": v, **box.as_dict(), "source": source} for v, (box, source) in boxes.items()]
    return write_csv(path, pd.DataFrame(rows, columns=BOX_COLUMNS))


def load_boxes(det_config_name: str, split: str = "train") -> dict[str, Box]:
    """``runs/det/<name>/boxes_<split>.csv`` as {volume_id: Box}."""
    path = boxes_path(det_config_name, split)
    if not path.is_file():
        name = path.parent.name
        raise DataError(
            f"crop boxes not found: {path}; run `make train-det CONFIG_DET=configs/{name}.yaml` first "
            "(or set data.crop: false)"
        )
    frame = pd.read_csv(path)
    missing = set(BOX_COLUMNS) - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)} (expected {','.join(BOX_COLUMNS)})")
    boxes = {}
    for i, row in enumerate(frame.itertuples(index=False)):
        try:
            boxes[str(row.volume_id)] = Box(int(row.y0), int(row.x0), int(row.y1), int(row.x1))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path} row {i + 2} ({row.volume_id}): {exc}; rerun `make train-det`") from None
    return boxes
