"""Case-grouped, stratified K folds, written once and reused by every stage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.config import CLASSES
from pipeline.data.catalog import DataError

log = logging.getLogger(__name__)

FOLD_COLUMNS = ["id", "case", "case_day", "slice", "fold", "has_label"]
EXCLUDED = -1  # fold of the day-volumes excluded by the config (known label faults)


def has_label(catalog: pd.DataFrame) -> np.ndarray:
    """True for slices with at least one non-empty class mask."""
    return np.logical_or.reduce([catalog[name].astype(str).str.len() > 0 for name in CLASSES]).astype(bool)


def make_folds(catalog: pd.DataFrame, n_folds: int, seed: int, exclude_days: tuple[str, ...] = ()) -> pd.DataFrame:
    """Assign every slice a fold; no case in two folds; stratified on empty/non-empty slices.

    Day-volumes listed in ``exclude_days`` get fold -1 and are used by no stage.
    """
    n_cases = catalog["case"].nunique()
    if n_cases < n_folds:
        raise DataError(f"{n_cases} cases cannot make {n_folds} case-disjoint folds; lower n_folds")
    out = catalog[["id", "case", "case_day", "slice"]].copy()
    out["has_label"] = has_label(catalog)
    out["fold"] = EXCLUDED
    unknown = sorted(set(exclude_days) - set(out["case_day"]))
    if unknown:
        log.info("exclude_days not in this dataset (nothing to exclude): %s", ", ".join(unknown))
    keep = ~out["case_day"].isin(exclude_days)
    if (~keep).any():
        log.info("excluding %d slices of %s", int((~keep).sum()), ", ".join(sorted(set(exclude_days) & set(out["case_day"]))))
    kept = out[keep]
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(kept, kept["has_label"], groups=kept["case"])):
        out.loc[kept.index[val_idx], "fold"] = fold
    return out[FOLD_COLUMNS]


def read_folds(root: Path) -> pd.DataFrame:
    """``$DATA_DIR/folds.csv``; tells the user to run ``make folds`` when it is missing."""
    path = Path(root) / "folds.csv"
    if not path.is_file():
        raise DataError(f"folds file not found: {path}. Run `make folds` (DATA_DIR={root}) first.")
    frame = pd.read_csv(path)
    missing = set(FOLD_COLUMNS) - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; delete it and run `make folds` again")
    return frame


def fold_numbers(folds: pd.DataFrame) -> list[int]:
    """The folds of a folds table, in order (the excluded days' -1 left out)."""
    return sorted(int(k) for k in set(folds["fold"]) if k != EXCLUDED)


def fold_days(folds: pd.DataFrame, fold: int | str) -> tuple[list[str], list[str]]:
    """(train days, validation days) of a fold; ``"all"`` trains on every non-excluded day."""
    usable = folds[folds["fold"] != EXCLUDED]
    if str(fold) == "all":
        return list(dict.fromkeys(usable["case_day"])), []
    fold = int(fold)
    if fold not in set(usable["fold"]):
        raise DataError(f"fold {fold} is not in folds.csv (folds: {sorted(set(usable['fold']))})")
    train = usable[usable["fold"] != fold]
    val = usable[usable["fold"] == fold]
    return list(dict.fromkeys(train["case_day"])), list(dict.fromkeys(val["case_day"]))
