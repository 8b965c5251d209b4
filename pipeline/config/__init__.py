"""Typed experiment configs: documented defaults, YAML deltas, strict validation.

A config file is a small delta over the defaults of the schema; ``stage`` picks the schema (``det``,
``cls``, ``seg``, ``ensemble``, ``folds``); ``base`` names another config file (relative to this one)
to start from. Unknown keys and wrong types fail before any work, naming the dotted key and the closest
valid one. The resolved config is frozen and is written next to every run (``config.yaml``).

- :mod:`~pipeline.config.schema`: the sections and stage configs (frozen dataclasses, defaults documented);
- :mod:`~pipeline.config.checks`: ranges, enumerations and the checks across keys, run at load;
- :mod:`~pipeline.config.networks3d`: the 3D member's MONAI networks and their stride (checked at load);
- :mod:`~pipeline.config.loader`: YAML, ``base`` chains, overrides, coercion, renamed keys.

Every name is imported from here: ``from pipeline.config import SegConfig, load_config``.
"""

from pipeline.config.checks import (
    CHECKS,
    Check,
    above,
    at_least,
    cross_checks,
    device_name,
    each,
    multiple_of,
    one_of,
    optional,
    within,
)
from pipeline.config.loader import (
    CONFIG_DIR,
    RENAMED_KEYS,
    config_from_text,
    dump_config,
    load_config,
    resolve_config_path,
    to_dict,
)
from pipeline.config.schema import (
    SCHEMAS,
    AugSpec,
    ClsConfig,
    Config,
    ConfigError,
    DataCfg,
    DetConfig,
    DetParams,
    EnsembleConfig,
    FoldsConfig,
    LossCfg,
    MemberCfg,
    MemberConfig,
    ModelCfg,
    Seg3DCfg,
    SegConfig,
    StageConfig,
    TrainCfg,
    TTACfg,
    TuneCfg,
)

__all__ = [
    "CHECKS",
    "CONFIG_DIR",
    "RENAMED_KEYS",
    "SCHEMAS",
    "AugSpec",
    "Check",
    "ClsConfig",
    "Config",
    "ConfigError",
    "DataCfg",
    "DetConfig",
    "DetParams",
    "EnsembleConfig",
    "FoldsConfig",
    "LossCfg",
    "MemberCfg",
    "MemberConfig",
    "ModelCfg",
    "Seg3DCfg",
    "SegConfig",
    "StageConfig",
    "TTACfg",
    "TrainCfg",
    "TuneCfg",
    "above",
    "at_least",
    "config_from_text",
    "cross_checks",
    "device_name",
    "dump_config",
    "each",
    "load_config",
    "multiple_of",
    "one_of",
    "optional",
    "resolve_config_path",
    "to_dict",
    "within",
]
