"""Group-disjoint, stratified K folds, written once and reused by every stage.

The group (a UW-Madison case, an LGG patient, a nerve subject) comes from the dataset's catalog:
no group is in two folds, so no patient is seen in training and validation at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.errors import DataError

log = logging.getLogger(__name__)

FOLD_COLUMNS = ["id", "group", "volume_id", "slice", "fold", "has_label"]
EXCLUDED = -1  # fold of the volumes excluded by the config (known label faults)


def make_folds(
    catalog: pd.DataFrame,
    has_label: np.ndarray,
    n_folds: int,
    seed: int,
    exclude_volumes: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Assign every slice a fold; no group in two folds; stratified on empty/non-empty slices.

    ``has_label`` (N,) is True for slices holding any class. Volumes listed in ``exclude_volumes``
    get fold -1 and are used by no stage.
    """
    n_groups = catalog["group"].nunique()
    if n_groups < n_folds:
        raise DataError(
            f"{n_groups} groups (patients) cannot make {n_folds} group-disjoint folds; lower n_folds"
        )
    out = catalog[["id", "group", "volume_id", "slice"]].copy()
    out["has_label"] = np.asarray(has_label, dtype=bool)
    out["fold"] = EXCLUDED
    unknown = sorted(set(exclude_volumes) - set(out["volume_id"]))
    if unknown:
        log.info("exclude_volumes not in this dataset (nothing to exclude): %s", ", ".join(unknown))
    keep = ~out["volume_id"].isin(exclude_volumes)
    if (~keep).any():
        log.info(
            "excluding %d slices of %s",
            int((~keep).sum()),
            ", ".join(sorted(set(exclude_volumes) & set(out["volume_id"]))),
        )
    kept = out[keep]
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(kept, kept["has_label"], groups=kept["group"])):
        out.loc[kept.index[val_idx], "fold"] = fold
    return out[FOLD_COLUMNS]


def read_folds(root: Path) -> pd.DataFrame:
    """``$DATA_DIR/folds.csv``; tells the user to run ``make folds`` when it is missing."""
    path = Path(root) / "folds.csv"
    if not path.is_file():
        raise DataError(f"folds file not found: {path}. Run `make folds` (DATA_DIR={root}) first.")
    frame = pd.read_csv(path, dtype={"id": str, "volume_id": str})
    missing = set(FOLD_COLUMNS) - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; delete it and run `make folds` again")
    return frame


def fold_numbers(folds: pd.DataFrame) -> list[int]:
    """The folds of a folds table, in order (the excluded volumes' -1 left out)."""
    return sorted(int(k) for k in set(folds["fold"]) if k != EXCLUDED)


def fold_volumes(folds: pd.DataFrame, fold: int | str) -> tuple[list[str], list[str]]:
    """(train volumes, validation volumes) of a fold; ``"all"`` trains on every non-excluded volume."""
    usable = folds[folds["fold"] != EXCLUDED]
    if str(fold) == "all":
        return list(dict.fromkeys(usable["volume_id"])), []
    fold = int(fold)
    if fold not in set(usable["fold"]):
        raise DataError(f"fold {fold} is not in folds.csv (folds: {sorted(set(usable['fold']))})")
    train = usable[usable["fold"] != fold]
    val = usable[usable["fold"] == fold]
    return list(dict.fromkeys(train["volume_id"])), list(dict.fromkeys(val["volume_id"]))
