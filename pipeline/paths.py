"""Where things live: data, caches, runs. Every path is derived, never discovered.

Environment variables override the defaults so the same code runs on the embedded synthetic
set, on the real Kaggle download and inside a Kaggle kernel:

- ``DATA_DIR``  (default ``data/<dataset>``): the dataset's Kaggle layout (train.csv, train/, ...).
- ``RUNS_DIR``  (default ``runs``): ``runs/<stage>/<config-name>/fold_<k>/``.
- ``CACHE_DIR`` (default ``cache``): decoded volumes as ``.npy``.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = PROJECT_ROOT / "data"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else default


def data_dir(override: str | os.PathLike | None = None, dataset: str | None = None) -> Path:
    """The dataset root: ``override`` if given, else ``$DATA_DIR``, else ``data/<dataset>``.

    ``dataset`` defaults to ``$DATASET``, else ``uwmgi`` (the embedded phantoms live in ``data/<name>``).
    """
    if override:
        return Path(override).expanduser()
    name = dataset or os.environ.get("DATASET", "").strip() or "uwmgi"
    return _env_path("DATA_DIR", DATA_ROOT / name)


def runs_dir() -> Path:
    return _env_path("RUNS_DIR", PROJECT_ROOT / "runs")


def cache_dir() -> Path:
    return _env_path("CACHE_DIR", PROJECT_ROOT / "cache")


def fold_name(fold: int | str) -> str:
    """``fold_0`` ... ``fold_4``; ``fold_all`` for a model trained on every case."""
    return "fold_all" if str(fold) == "all" else f"fold_{int(fold)}"


def run_dir(stage: str, config_name: str, fold: int | str | None = None) -> Path:
    """``runs/<stage>/<config-name>[/fold_<k>]``: the one place a run's files go."""
    base = runs_dir() / stage / config_name
    return base if fold is None else base / fold_name(fold)


def folds_path(root: Path | None = None) -> Path:
    return (root or data_dir()) / "folds.csv"
