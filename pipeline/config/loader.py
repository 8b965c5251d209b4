"""Reading configs: YAML files and their ``base`` chains, ``--set`` overrides, type coercion, validation.

A config file is a small delta over the schema's documented defaults (:mod:`pipeline.config.schema`);
``stage`` picks the schema, ``base`` names another config file (relative to this one) to start from.
Unknown keys and wrong types fail before any work, naming the dotted key and the closest valid one; a
renamed key names its new name (:data:`RENAMED_KEYS`). The resolved config is frozen and is written
next to every run (``config.yaml``, :func:`dump_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import yaml

from pipeline.config.checks import CHECKS, cross_checks
from pipeline.config.schema import (
    SCHEMAS,
    ClsConfig,
    Config,
    ConfigError,
    DetConfig,
    EnsembleConfig,
    FoldsConfig,
    SegConfig,
    StageConfig,
)

T = TypeVar("T")
Defaults = Callable[[str, str], dict[str, Any]]  # (dataset, stage) -> a delta under the file's values

# former dotted key -> its name now: a config (or --set) still using the old name fails naming the new one
RENAMED_KEYS = {
    "data.max_days": "data.max_volumes",
    "det.slices_per_day": "det.slices_per_volume",
    "debug_train_days": "debug_train_volumes",
}

# --------------------------------------------------------------------------- validation


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(schema: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """An instance of the dataclass ``schema`` from ``values``, coerced and checked (keys under ``prefix``)."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]  # a dataclass
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            if prefix + key in RENAMED_KEYS:
                raise ConfigError(
                    f"config key '{prefix}{key}' was renamed to '{RENAMED_KEYS[prefix + key]}': use the new name"
                )
            raise ConfigError(f"unknown config key '{prefix}{key}'{_suggest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    built = schema(**kwargs)
    for key, check in CHECKS.get(schema, {}).items():
        value = getattr(built, key)
        problem = check(value)
        if problem:
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"config key '{prefix}{key}' = {shown!r} {problem}")
    for key, problem in cross_checks(built):
        raise ConfigError(f"config key '{prefix}{key}' {problem}")
    return built


def _merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("params", "kwargs"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(value: object) -> Any:
    """A config (or any part of one) as plain YAML-able data: dataclasses become dicts, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base:
        parent = _read_yaml(resolve_config_path(base, relative_to=path.parent))
        parent.pop("name", None)  # a derived config is named after its own file
        raw = _merge(parent, raw)
    return raw


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, text = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(text)


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_config_path(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config by path, or by bare name under ``configs/`` (``demo_seg`` -> configs/demo_seg.yaml)."""
    path = Path(name)
    candidates = [path]
    if relative_to is not None:
        candidates.append(relative_to / path)
    candidates += [CONFIG_DIR / path, CONFIG_DIR / path.with_suffix(".yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config '{name}' not found (looked at {', '.join(str(c) for c in candidates)})")


@overload
def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = ...,
    *,
    stage: Literal["seg"],
    defaults: Defaults | None = ...,
) -> SegConfig: ...
@overload
def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = ...,
    *,
    stage: Literal["cls"],
    defaults: Defaults | None = ...,
) -> ClsConfig: ...
@overload
def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = ...,
    *,
    stage: Literal["det"],
    defaults: Defaults | None = ...,
) -> DetConfig: ...
@overload
def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = ...,
    *,
    stage: Literal["ensemble"],
    defaults: Defaults | None = ...,
) -> EnsembleConfig: ...
@overload
def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = ...,
    *,
    stage: Literal["folds"],
    defaults: Defaults | None = ...,
) -> FoldsConfig: ...
@overload
def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = ...,
    stage: str | None = ...,
    defaults: Defaults | None = ...,
) -> Config: ...
def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    stage: str | None = None,
    defaults: Defaults | None = None,
) -> Config:
    """Load, merge over defaults, validate and freeze a config.

    ``stage`` (optional) asserts which schema the file must use; ``overrides`` are
    ``key.sub=value`` strings (values parsed as YAML) applied last. ``defaults(dataset, stage)``
    (optional) gives a delta that goes under the file's values: the dataset's own defaults
    (``pipeline.datasets.load_config`` passes them).
    """
    file = resolve_config_path(path)
    raw = _read_yaml(file)
    for item in overrides or []:
        keys, value = _parse_override(item)
        raw = _merge(raw, _nest(keys, value))
    raw.setdefault("name", file.stem)
    if defaults is not None:
        dataset = raw.get("dataset", "uwmgi")
        kind = raw.get("stage", stage)
        if isinstance(dataset, str) and isinstance(kind, str):
            try:
                raw = _merge(defaults(dataset, kind), raw)
            except ConfigError as exc:
                raise ConfigError(f"{file}: {exc}") from None
    return _validate(raw, str(file), stage)


def _validate(raw: dict[str, Any], source: str, stage: str | None) -> Config:
    raw = {k: v for k, v in raw.items() if k != "machine"}  # a run's fingerprint (runtime.record_machine)
    kind = raw.get("stage", stage)
    if kind not in SCHEMAS:
        raise ConfigError(f"{source}: config key 'stage' must be one of {sorted(SCHEMAS)}, got {kind!r}")
    if stage is not None and kind != stage:
        raise ConfigError(f"{source}: this is a '{kind}' config but the '{stage}' stage was asked to run it")
    try:
        built = _build(SCHEMAS[kind], raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return typing.cast(Config, built)  # SCHEMAS holds the members of Config only


@overload
def config_from_text(text: str, source: str = ..., *, stage: Literal["seg"]) -> SegConfig: ...
@overload
def config_from_text(text: str, source: str = ..., *, stage: Literal["cls"]) -> ClsConfig: ...
@overload
def config_from_text(text: str, source: str = ..., *, stage: Literal["det"]) -> DetConfig: ...
@overload
def config_from_text(text: str, source: str = ..., *, stage: Literal["ensemble"]) -> EnsembleConfig: ...
@overload
def config_from_text(text: str, source: str = ..., stage: str | None = ...) -> Config: ...
def config_from_text(text: str, source: str = "<text>", stage: str | None = None) -> Config:
    """A config from YAML text (a run folder's resolved ``config.yaml``), validated like a file."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys, got {type(raw).__name__}")
    return _validate(raw, source, stage)


def dump_config(cfg: StageConfig) -> str:
    """A resolved config as YAML (what a run folder's ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
