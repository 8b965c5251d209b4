"""Dataset plug-ins: one module per dataset, picked by name (``DATASET=uwmgi|lgg|nerve``).

:func:`get_dataset` returns a module's ``DATASET`` spec (:class:`~pipeline.datasets.base.DatasetSpec`);
:func:`load_config` loads a stage config with its dataset's ``config_defaults`` under the file's
own values. Adding a dataset: write ``pipeline/datasets/<name>.py`` with a spec and add it to
:data:`DATASETS`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from pipeline import config as config_module
from pipeline.config import ConfigError
from pipeline.datasets.base import DatasetSpec

DATASETS = {
    "uwmgi": "pipeline.datasets.uwmgi",
    "lgg": "pipeline.datasets.lgg",
    "nerve": "pipeline.datasets.nerve",
}
DEFAULT_DATASET = "uwmgi"


def get_dataset(name: str | None = None) -> DatasetSpec:
    """The spec of dataset ``name`` (default ``$DATASET``, else uwmgi); unknown names list the valid ones."""
    name = name or os.environ.get("DATASET", "").strip() or DEFAULT_DATASET
    if name not in DATASETS:
        raise ConfigError(
            f"unknown dataset '{name}'; valid: {', '.join(DATASETS)} (DATASET= or the config's 'dataset')"
        )
    return importlib.import_module(DATASETS[name]).DATASET


def config_defaults(dataset: str, stage: str) -> dict[str, Any]:
    """The config delta the dataset declares for a stage (``config_defaults[stage]``)."""
    return dict(get_dataset(dataset).config_defaults.get(stage, {}))


def load_config(path: Any, overrides: list[str] | None = None, stage: str | None = None) -> Any:
    """:func:`pipeline.config.load_config` with the dataset's defaults under the file's values.

    A config of another dataset than ``$DATASET`` (when set) fails here, before any work.
    """
    cfg = config_module.load_config(path, overrides, stage=stage, defaults=config_defaults)
    get_dataset(cfg.dataset)
    wanted = os.environ.get("DATASET", "").strip()
    if wanted and wanted != cfg.dataset:
        raise ConfigError(
            f"{path}: this config is for dataset '{cfg.dataset}' but DATASET={wanted}; "
            f"pick a {wanted} config (configs/{'' if wanted == DEFAULT_DATASET else wanted + '_'}demo_*.yaml) or unset DATASET"
        )
    return cfg
