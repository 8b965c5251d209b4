"""Typed experiment configs: documented defaults, YAML deltas, strict validation.

A config file is a small delta over the defaults below. ``stage`` picks the schema
(``det``, ``cls``, ``seg``, ``ensemble``, ``folds``); ``base`` names another config file
(relative to this one) to start from. Unknown keys and wrong types fail before any work,
naming the dotted key and the closest valid one. The resolved config is frozen and is
written next to every run (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError


class ConfigError(PipelineError, ValueError):
    """A config key is unknown, of the wrong type, or out of range."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataCfg:
    """Input geometry shared by detector, classifier and segmenters."""

    data_dir: str | None = None  # None: $DATA_DIR, else data/<dataset>
    k: int = 1  # neighbours on each side: 2k+1 input channels
    stride: int = 2  # slice distance between neighbours (the 1st place used [i-2, i, i+2])
    img_size: tuple[int, int] = (384, 384)  # network input (H, W)
    resize: str = "resize"  # "resize" (stretch the crop) or "pad" (letterbox, keep aspect)
    normalize: str = "image"  # "image" (per slice) or "volume" (per day) percentile scaling
    crop: bool = True  # crop every volume to the detector's body box
    det_config: str = "demo_det"  # the detector run whose boxes are used when crop is on
    train_on: str = "labelled"  # "labelled" slices only, or "all"
    # labels that are missing, not empty (UW-Madison's truncated annotation): slices after the last
    # labelled slice of a volume (and, with missing_gaps, unlabelled slices between labelled ones)
    # are "empty" (trained as empty, the default), "drop" (left out of training: the 1st place's notail)
    # or "ignore" (kept, but missing_classes contribute no loss there, nnU-Net's ignore label)
    missing_labels: str = "empty"
    missing_classes: tuple[str, ...] = ()  # classes the ignore applies to; () = every class
    missing_gaps: bool = False  # also unlabelled slices between the first and last labelled one
    missing_tail: int | None = None  # slices after the last labelled one that count; None = to the end
    max_days: int | None = None  # cap on training volumes (tests and smoke runs)


@dataclass(frozen=True)
class ModelCfg:
    arch: str = "Unet"  # smp architecture by name (Unet, UnetPlusPlus, FPN, ...) or "timm" for cls
    encoder: str = "tu-resnet18"  # smp encoder or timm model ("tu-" prefix for timm in smp)
    # the encoder's start: "imagenet" reads the weights `make weights` put in the local cache ($WEIGHTS_DIR:
    # smp's ImageNet encoder, or timm's default pretrained tag for timm models); null starts random
    encoder_weights: str | None = None
    pretrained_path: str | None = None  # a local weights file of your own (then encoder_weights: null)
    dropout: float = 0.0  # classifier head dropout
    freeze_encoder: int = 0  # freeze the first N encoder stages (0: fine-tune everything)
    spatial_dims: int = 2  # 2: smp 2.5D segmenter; 3: a MONAI 3D network by name (arch), see Seg3DCfg
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    accum_steps: int = 1
    clip_grad: float | None = 1.0
    ema: bool = False
    ema_decay: float = 0.999
    amp: bool = True  # bf16/fp16 on CUDA; ignored on CPU
    channels_last: bool = True  # NHWC memory layout, on CUDA and CPU (oneDNN convs are faster in it too)
    num_workers: int = 2
    val_every: int = 1
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda"
    max_steps_per_epoch: int | None = None  # cap for smoke runs
    val_batch_size: int | None = None
    sync_bn: bool = False  # SyncBatchNorm across processes when trained with torchrun (GPUS > 1)
    # experiment tracker of each fold (pipeline/train/tracker.py): "none", or "mlflow" (params = the resolved
    # config, per-epoch metrics, metrics.csv; `pip install -r requirements-tracker.txt`); tracker_uri: null =
    # a local store, sqlite:///$RUNS_DIR/mlflow.db (no network), else a tracking server or database URI of yours
    tracker: str = "none"
    tracker_uri: str | None = None


@dataclass(frozen=True)
class LossCfg:
    """Weighted sum of losses; a weight of 0 switches a term off."""

    bce: float = 1.0
    dice: float = 1.0
    tversky: float = 0.0
    lovasz: float = 0.0
    focal: float = 0.0
    tversky_alpha: float = 0.5
    tversky_beta: float = 0.5
    focal_gamma: float = 2.0
    pos_weight: float | None = None  # BCE positive weight (classifier)


@dataclass(frozen=True)
class Seg3DCfg:
    """The 3D member's patches and sliding window (used when ``model.spatial_dims == 3``).

    A volume is cropped to the detector's box and resampled in-plane to ``data.img_size``, its
    slices kept; sizes are (slices, H, W).
    """

    patch_size: tuple[int, int, int] = (32, 96, 96)  # training patch
    samples_per_volume: int = 4  # patches drawn from a volume each time it is visited
    pos: float = 2.0  # MONAI positive / negative patch-centre ratio (centres on labelled voxels)
    neg: float = 1.0
    roi_size: tuple[int, int, int] = (32, 128, 128)  # sliding-window ROI at inference
    overlap: float = 0.5  # sliding-window overlap
    blend: str = "gaussian"  # sliding-window blending of overlapping windows: gaussian or constant
    sw_batch_size: int = 2  # windows per forward pass


@dataclass(frozen=True)
class AugSpec:
    """One albumentations transform by class name with its exact arguments."""

    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetParams:
    model: str = "yolov8n.yaml"  # ultralytics model yaml (the architecture; no .pt is read at training)
    # "coco": start from the COCO checkpoint ultralytics publishes for det.model's size (yolov8n.yaml ->
    # yolov8n.pt), read as a plain state dict from the local weights cache (`make weights`); null: from scratch
    pretrained: str | None = None
    imgsz: int = 256
    epochs: int = 10
    batch: int = 16
    slices_per_day: int = 12  # slices sampled per volume for the YOLO dataset
    val_fraction: float = 0.2
    conf: float = 0.25
    margin: float = 0.05  # padding of the day box, fraction of the image side
    threshold_quantile: float = 0.9  # body threshold: this quantile of non-zero pixels, scaled
    threshold_scale: float = 0.25  # (the median failed where noisy background is most of the frame)
    workers: int = 0
    device: str = "auto"
    seed: int = 42
    predict_step: int = 1  # detect on every n-th slice of a day (the day box barely changes)
    train_args: dict[str, Any] = field(default_factory=dict)  # extra ultralytics train() args


@dataclass(frozen=True)
class TTACfg:
    hflip: bool = True
    vflip: bool = False
    scales: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class MemberCfg:
    config: str = ""  # config file of a trained segmenter (relative to configs/ or a path)
    weight: float = 1.0  # starting blend weight; tuned on OOF
    folds: tuple[int, ...] | None = None  # None: every fold found in the run folder


@dataclass(frozen=True)
class TuneCfg:
    pixel_thresholds: tuple[float, ...] = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
    gate_thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    min_component_sizes: tuple[int, ...] = (0, 10, 25, 50, 100, 200)
    blend_steps: int = 5  # grid resolution of member weights
    sweeps: int = 2  # per-class coordinate sweeps (pixel, gate, size); later ones stop when nothing moves
    # per-slice gate on the blended probability (1st place: keep a class on a slice only if more than
    # N pixels have p > t, N = 12, t = 0.6): candidates of N (0 = off) and of t
    prob_gate_pixels: tuple[int, ...] = (0,)
    prob_gate_levels: tuple[float, ...] = (0.6,)
    # z-continuity (3rd place): an organ's first and last slice set by k consecutive positive slices;
    # candidates of k (0 = off); volumetric datasets only
    z_runs: tuple[int, ...] = (0,)
    per_class_blend: bool = True  # blend weights chosen per class (else one set for every class)
    holdout: float = 0.3  # fraction of OOF volume groups held apart to report an honest tuned score (0: off)
    holdout_seed: int = 0
    # > 1: the held-apart estimate is cross-fitted instead: the OOF groups are dealt into this many
    # folds (seeded by holdout_seed), a search runs on all but each fold and is scored on it, so every
    # volume is held apart once and the estimate has the in-sample score's volumes (holdout is unused)
    holdout_folds: int = 0
    # a candidate replaces the current value (the step's start or "off" at first) only if it scores
    # more than this above it: shrinkage towards the defaults where the OOF is small and noisy
    min_gain: float = 0.0
    # with members and a held-apart split: when the blend chosen on the tuning part scores below one of
    # its members alone on the held-apart groups, that member is kept alone (its post-processing re-tuned)
    blend_guard: bool = True


# --------------------------------------------------------------------------- stage configs


@dataclass(frozen=True)
class FoldsConfig:
    name: str = "folds"
    stage: str = "folds"
    dataset: str = "uwmgi"  # the dataset plug-in (pipeline/datasets/<name>.py)
    data_dir: str | None = None
    n_folds: int = 5
    seed: int = 42
    exclude_volumes: tuple[str, ...] = ()  # volumes with known label faults (the dataset declares them)


@dataclass(frozen=True)
class DetConfig:
    name: str = ""
    stage: str = "det"
    dataset: str = "uwmgi"  # the dataset plug-in (pipeline/datasets/<name>.py)
    data: DataCfg = field(default_factory=DataCfg)
    det: DetParams = field(default_factory=DetParams)


@dataclass(frozen=True)
class ClsConfig:
    name: str = ""
    stage: str = "cls"
    dataset: str = "uwmgi"  # the dataset plug-in (pipeline/datasets/<name>.py)
    data: DataCfg = field(default_factory=lambda: DataCfg(train_on="all"))
    model: ModelCfg = field(default_factory=lambda: ModelCfg(arch="timm", encoder="resnet18"))
    train: TrainCfg = field(default_factory=TrainCfg)
    loss: LossCfg = field(default_factory=lambda: LossCfg(bce=1.0, dice=0.0))
    augment: tuple[AugSpec, ...] = ()


@dataclass(frozen=True)
class SegConfig:
    name: str = ""
    stage: str = "seg"
    dataset: str = "uwmgi"  # the dataset plug-in (pipeline/datasets/<name>.py)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    augment: tuple[AugSpec, ...] = ()
    seg3d: Seg3DCfg = field(default_factory=Seg3DCfg)  # the 3D member (model.spatial_dims: 3)


@dataclass(frozen=True)
class EnsembleConfig:
    name: str = ""
    stage: str = "ensemble"
    dataset: str = "uwmgi"  # the dataset plug-in (pipeline/datasets/<name>.py)
    data_dir: str | None = None
    members: tuple[MemberCfg, ...] = ()
    classifier: str | None = None  # cls config whose OOF/weights gate the slices; None: no gate
    det_config: str | None = None  # detector run for crops at submit; None: members' own setting
    tta: TTACfg = field(default_factory=TTACfg)
    tune: TuneCfg = field(default_factory=TuneCfg)
    batch_size: int = 16
    device: str = "auto"
    amp: bool = True
    debug_train_days: int = 0  # >0: run submit over this many train days (Kaggle debug switch)
    report_slices: int = 6  # overlay figures drawn by `make cv`


# --------------------------------------------------------------------------- value checks
# Every range and enumeration is checked here, when the config is loaded, before any data is read.
# A check returns None when the value is fine, else what is allowed.

Check = Callable[[Any], str | None]


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def above(low: float) -> Check:
    return lambda v: None if v > low else f"must be > {low:g}"


def within(low: float, high: float, high_open: bool = False) -> Check:
    closing = ")" if high_open else "]"
    ok = (lambda v: low <= v < high) if high_open else (lambda v: low <= v <= high)
    return lambda v: None if ok(v) else f"must be in [{low:g}, {high:g}{closing}"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def each(check: Check) -> Check:
    def run(values: Any) -> str | None:
        for i, v in enumerate(values):
            problem = check(v)
            if problem:
                return f"item {i} ({v!r}) {problem}"
        return None

    return run


def multiple_of(n: int) -> Check:
    return lambda v: None if v % n == 0 else f"must be a multiple of {n}"


def device_name(v: str) -> str | None:
    ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
    return None if ok else "must be auto, cpu, cuda or cuda:<index>"


def _both(*checks: Check) -> Check:
    return lambda v: next((p for p in (c(v) for c in checks) if p), None)


def _installed(tracker: str) -> str | None:
    """A tracker other than none needs its package (found without importing it)."""
    import importlib.util

    if tracker == "none" or importlib.util.find_spec(tracker) is not None:
        return None
    return f"needs the {tracker} package: pip install -r requirements-tracker.txt (make install does)"


CHECKS: dict[type, dict[str, Check]] = {
    DataCfg: {
        "k": at_least(0),
        "stride": at_least(1),
        "img_size": each(at_least(16)),  # divisibility by the encoder's stride: _cross_checks
        "resize": one_of("resize", "pad"),
        "normalize": one_of("image", "volume"),
        "train_on": one_of("labelled", "all"),
        "max_days": optional(at_least(1)),
        "missing_labels": one_of("empty", "drop", "ignore"),
        "missing_tail": optional(at_least(1)),
    },
    ModelCfg: {
        "dropout": within(0, 1, high_open=True),
        "freeze_encoder": at_least(0),
        "encoder_weights": optional(one_of("imagenet")),
        "spatial_dims": lambda v: None if v in (2, 3) else "must be 2 (2.5D smp) or 3 (MONAI 3D)",
    },
    Seg3DCfg: {
        "patch_size": each(at_least(1)),
        "samples_per_volume": at_least(1),
        "pos": at_least(0),
        "neg": at_least(0),
        "roi_size": each(at_least(1)),
        "overlap": within(0, 1, high_open=True),
        "blend": one_of("gaussian", "constant"),
        "sw_batch_size": at_least(1),
    },
    TrainCfg: {
        "epochs": at_least(1),
        "batch_size": at_least(1),
        "lr": above(0),
        "weight_decay": at_least(0),
        "warmup_epochs": at_least(0),
        "min_lr_ratio": within(0, 1),
        "accum_steps": at_least(1),
        "clip_grad": optional(above(0)),
        "ema_decay": within(0, 1, high_open=True),
        "num_workers": at_least(0),
        "val_every": at_least(1),
        "device": device_name,
        "max_steps_per_epoch": optional(at_least(1)),
        "val_batch_size": optional(at_least(1)),
        "tracker": _both(one_of("none", "mlflow"), _installed),
    },
    LossCfg: {
        **{k: at_least(0) for k in ("bce", "dice", "tversky", "lovasz", "focal", "focal_gamma")},
        "tversky_alpha": within(0, 1),
        "tversky_beta": within(0, 1),
        "pos_weight": optional(above(0)),
    },
    DetParams: {
        "imgsz": _both(at_least(32), multiple_of(32)),
        "epochs": at_least(1),
        "batch": at_least(1),
        "slices_per_day": at_least(1),
        "val_fraction": within(0, 1, high_open=True),
        "conf": within(0, 1),
        "margin": within(0, 0.5, high_open=True),
        "threshold_quantile": within(0, 1),
        "threshold_scale": above(0),
        "workers": at_least(0),
        "device": device_name,
        "predict_step": at_least(1),
        "pretrained": optional(one_of("coco")),
    },
    TTACfg: {"scales": _both(lambda v: None if len(v) else "must list at least one scale", each(above(0)))},
    MemberCfg: {"weight": at_least(0), "folds": optional(each(at_least(0)))},
    TuneCfg: {
        "pixel_thresholds": each(within(0, 1)),
        "gate_thresholds": each(within(0, 1)),
        "min_component_sizes": each(at_least(0)),
        "blend_steps": at_least(1),
        "sweeps": at_least(1),
        "prob_gate_pixels": _both(
            lambda v: None if len(v) else "must list at least one value", each(at_least(0))
        ),
        "prob_gate_levels": _both(
            lambda v: None if len(v) else "must list at least one value", each(within(0, 1))
        ),
        "z_runs": _both(lambda v: None if len(v) else "must list at least one value", each(at_least(0))),
        "holdout": within(0, 1, high_open=True),
        "holdout_folds": lambda v: None if v == 0 or v >= 2 else "must be 0 (off) or at least 2",
        "min_gain": at_least(0),
    },
    FoldsConfig: {"n_folds": at_least(2)},
    EnsembleConfig: {
        "batch_size": at_least(1),
        "device": device_name,
        "debug_train_days": at_least(0),
        "report_slices": at_least(0),
    },
}


def _cross_checks(cfg: Any) -> list[tuple[str, str]]:
    """(key, problem) of checks that involve several keys."""
    out = []
    if isinstance(cfg, TrainCfg) and cfg.tracker_uri and cfg.tracker == "none":
        out.append(
            (
                "tracker_uri",
                f"= {cfg.tracker_uri!r} is set but train.tracker is none: set train.tracker: mlflow",
            )
        )
    if isinstance(cfg, ModelCfg):
        out += _start_weights_checks(cfg)
    loss = getattr(cfg, "loss", None)
    if isinstance(loss, LossCfg) and not any(
        getattr(loss, k) > 0 for k in ("bce", "dice", "tversky", "lovasz", "focal")
    ):
        out.append(("loss", "every loss weight (bce, dice, tversky, lovasz, focal) is 0: set one > 0"))
    if isinstance(cfg, ClsConfig) and cfg.loss.lovasz > 0:
        out.append(("loss.lovasz", "applies to segmentation only: set it to 0 for a classifier"))
    three_d = isinstance(getattr(cfg, "model", None), ModelCfg) and cfg.model.spatial_dims == 3
    if three_d and not isinstance(cfg, SegConfig):
        out.append(("model.spatial_dims", "= 3 is for segmenters only (a seg config)"))
    if three_d and cfg.train.channels_last:
        out.append(("train.channels_last", "must be false for a 3D member (the NHWC layout is 2D)"))
    if three_d and cfg.model.freeze_encoder:
        out.append(("model.freeze_encoder", "applies to smp encoders only: set it to 0 for a 3D member"))
    if three_d and cfg.data.k != 0:
        out.append(
            ("data.k", f"= {cfg.data.k} must be 0 for a 3D member: its depth axis holds the neighbours")
        )
    smp_model = (isinstance(cfg, SegConfig) and not three_d) or (
        isinstance(cfg, ClsConfig) and cfg.model.arch.lower() != "timm"
    )
    if smp_model:  # an smp encoder halves the input encoder_depth times (5 by default)
        stride = 2 ** int(cfg.model.kwargs.get("encoder_depth", 5))
        bad = [v for v in cfg.data.img_size if v % stride]
        if bad:
            out.append(
                (
                    "data.img_size",
                    f"= {list(cfg.data.img_size)} must be multiples of {stride}, the stride of "
                    f"{cfg.model.arch}/{cfg.model.encoder} (encoder_depth {stride.bit_length() - 1})",
                )
            )
    return out


def _start_weights_checks(model: ModelCfg) -> list[tuple[str, str]]:
    """A network's starting weights: one source, none for MONAI's 3D networks, and none to freeze."""
    out = []
    if model.encoder_weights and model.spatial_dims == 3:
        out.append(
            (
                "encoder_weights",
                f"= {model.encoder_weights!r}: MONAI's 3D networks have no ImageNet weights; set it to "
                "null (model.pretrained_path loads a local file of your own)",
            )
        )
    if model.encoder_weights and model.pretrained_path:
        out.append(
            (
                "encoder_weights",
                f"= {model.encoder_weights!r} and model.pretrained_path are both set: the encoder starts "
                "from one of them; set the other to null",
            )
        )
    if model.freeze_encoder and not (model.encoder_weights or model.pretrained_path):
        out.append(
            (
                "freeze_encoder",
                f"= {model.freeze_encoder} would freeze randomly initialised stages: set "
                "model.encoder_weights: imagenet (fetched once by `make weights`) or model.pretrained_path, "
                "or freeze_encoder: 0",
            )
        )
    return out


SCHEMAS: dict[str, type] = {
    "folds": FoldsConfig,
    "det": DetConfig,
    "cls": ClsConfig,
    "seg": SegConfig,
    "ensemble": EnsembleConfig,
}

Config = FoldsConfig | DetConfig | ClsConfig | SegConfig | EnsembleConfig

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
    if dataclasses.is_dataclass(tp):
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


def _build(schema: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_suggest(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    built = schema(**kwargs)
    for key, check in CHECKS.get(schema, {}).items():
        value = getattr(built, key)
        problem = check(value)
        if problem:
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"config key '{prefix}{key}' = {shown!r} {problem}")
    for key, problem in _cross_checks(built):
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


def to_dict(cfg: Any) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


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


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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


def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    stage: str | None = None,
    defaults: Callable[[str, str], dict[str, Any]] | None = None,
) -> Any:
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


def _validate(raw: dict[str, Any], source: str, stage: str | None) -> Any:
    raw = {k: v for k, v in raw.items() if k != "machine"}  # a run's fingerprint (runtime.record_machine)
    kind = raw.get("stage", stage)
    if kind not in SCHEMAS:
        raise ConfigError(f"{source}: config key 'stage' must be one of {sorted(SCHEMAS)}, got {kind!r}")
    if stage is not None and kind != stage:
        raise ConfigError(f"{source}: this is a '{kind}' config but the '{stage}' stage was asked to run it")
    try:
        return _build(SCHEMAS[kind], raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_from_text(text: str, source: str = "<text>", stage: str | None = None) -> Any:
    """A config from YAML text (a run folder's resolved ``config.yaml``), validated like a file."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping of keys, got {type(raw).__name__}")
    return _validate(raw, source, stage)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
