"""Dataset plug-ins: one module per dataset, picked by name (``DATASET=uwmgi|lgg|nerve``).

:func:`get_dataset` returns a plug-in's spec (:class:`~pipeline.datasets.base.DatasetSpec`); the stages
look it up once and hand it down. The built-in plug-ins (:data:`BUILTIN`) are imported on first use. A
dataset defined outside this package joins with :func:`register` (``DATASET = register(MySpec())`` in
its module), and a stage run from the command line imports it when ``$DATASET_MODULES`` names its
module (comma-separated). :func:`load_config` loads a stage config with its dataset's
``config_defaults`` under the file's own values.

Adding a dataset: one module with a spec (copy one of ``uwmgi``, ``lgg``, ``nerve``), its phantom
(:mod:`pipeline.phantoms`) and its configs ``configs/<name>_demo_*.yaml``; list the module in
:data:`BUILTIN`, or register it from outside.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Literal, overload

from pipeline import config as config_module
from pipeline.config import ClsConfig, Config, ConfigError, DetConfig, EnsembleConfig, FoldsConfig, SegConfig
from pipeline.datasets.base import ContractError, DatasetSpec

BUILTIN = {
    "uwmgi": "pipeline.datasets.uwmgi",
    "lgg": "pipeline.datasets.lgg",
    "nerve": "pipeline.datasets.nerve",
}
DEFAULT_DATASET = "uwmgi"
PLUGINS_ENV = "DATASET_MODULES"
_registered: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a plug-in defined outside this package; returns it. A name already taken fails loudly."""
    if not isinstance(spec, DatasetSpec):
        raise ContractError(f"register() takes a DatasetSpec instance, got {spec!r}")
    taken = _registered.get(spec.name)
    if spec.name in BUILTIN or (taken is not None and taken is not spec):
        raise ContractError(f"dataset name '{spec.name}' is taken; registered: {', '.join(dataset_names())}")
    _registered[spec.name] = spec
    return spec


def _import_plugins() -> None:
    """Import the modules ``$DATASET_MODULES`` names; one defining ``DATASET`` is registered."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            spec = getattr(importlib.import_module(module), "DATASET", None)
        except ImportError as exc:
            raise ConfigError(f"{PLUGINS_ENV} names '{module}', which does not import: {exc}") from None
        if isinstance(spec, DatasetSpec) and _registered.get(spec.name) is not spec:
            register(spec)


def dataset_names() -> list[str]:
    """Every dataset a stage can run: the built-in ones, then the registered ones."""
    _import_plugins()
    return [*BUILTIN, *_registered]


def get_dataset(name: str | None = None) -> DatasetSpec:
    """The spec of dataset ``name`` (default ``$DATASET``, else uwmgi); unknown names list the valid ones."""
    name = name or os.environ.get("DATASET", "").strip() or DEFAULT_DATASET
    if name in BUILTIN:
        spec = importlib.import_module(BUILTIN[name]).DATASET
        return spec  # type: ignore[no-any-return]
    if name not in _registered:
        _import_plugins()
    if name not in _registered:
        raise ConfigError(
            f"unknown dataset '{name}'; valid: {', '.join(dataset_names())} (DATASET= or the config's "
            f"'dataset'; a plug-in outside pipeline/datasets: register() it or name its module in {PLUGINS_ENV})"
        )
    return _registered[name]


def config_prefix(name: str) -> str:
    """How a dataset's configs are named: ``configs/<prefix>demo_seg.yaml`` (none for the default)."""
    return "" if name == DEFAULT_DATASET else f"{name}_"


def config_defaults(dataset: str, stage: str) -> dict[str, Any]:
    """The config delta the dataset declares for a stage (``config_defaults[stage]``)."""
    return dict(get_dataset(dataset).config_defaults.get(stage, {}))


PathLike = str | os.PathLike


@overload
def load_config(path: PathLike, overrides: list[str] | None = ..., *, stage: Literal["seg"]) -> SegConfig: ...
@overload
def load_config(path: PathLike, overrides: list[str] | None = ..., *, stage: Literal["cls"]) -> ClsConfig: ...
@overload
def load_config(path: PathLike, overrides: list[str] | None = ..., *, stage: Literal["det"]) -> DetConfig: ...
@overload
def load_config(
    path: PathLike, overrides: list[str] | None = ..., *, stage: Literal["ensemble"]
) -> EnsembleConfig: ...
@overload
def load_config(
    path: PathLike, overrides: list[str] | None = ..., *, stage: Literal["folds"]
) -> FoldsConfig: ...
@overload
def load_config(path: PathLike, overrides: list[str] | None = ..., stage: str | None = ...) -> Config: ...
def load_config(path: PathLike, overrides: list[str] | None = None, stage: str | None = None) -> Config:
    """:func:`pipeline.config.load_config` with the dataset's defaults under the file's values.

    A config of another dataset than ``$DATASET`` (when set) fails here, before any work.
    """
    cfg = config_module.load_config(path, overrides, stage=stage, defaults=config_defaults)
    get_dataset(cfg.dataset)
    wanted = os.environ.get("DATASET", "").strip()
    if wanted and wanted != cfg.dataset:
        raise ConfigError(
            f"{path}: this config is for dataset '{cfg.dataset}' but DATASET={wanted}; "
            f"pick a {wanted} config (configs/{config_prefix(wanted)}demo_*.yaml) or unset DATASET"
        )
    return cfg
