"""Value checks of the config schema, run when a config is loaded, before any data is read.

:data:`CHECKS` holds a range or enumeration per field; a check returns None when the value is fine,
else what is allowed. :func:`cross_checks` are the checks that involve several keys (a 3D member's
sizes against its network's stride among them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config.networks3d import ARCHS_3D, arch3d, network_kwargs, size_problems
from pipeline.config.schema import (
    ClsConfig,
    ConfigError,
    DataCfg,
    DetParams,
    EnsembleConfig,
    FoldsConfig,
    LossCfg,
    MemberCfg,
    ModelCfg,
    Seg3DCfg,
    SegConfig,
    TrainCfg,
    TTACfg,
    TuneCfg,
)

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
        "img_size": each(at_least(16)),  # divisibility by the encoder's stride: cross_checks
        "resize": one_of("resize", "pad"),
        "normalize": one_of("image", "volume", "channel"),
        "channel_dropout": within(0, 1, high_open=True),
        "train_on": one_of("labelled", "all"),
        "max_volumes": optional(at_least(1)),
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
        "slices_per_volume": at_least(1),
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
        "component_fractions": _both(
            lambda v: None if len(v) else "must list at least one value", each(within(0, 1))
        ),
        "holdout": within(0, 1, high_open=True),
        "holdout_folds": lambda v: None if v == 0 or v >= 2 else "must be 0 (off) or at least 2",
        "min_gain": at_least(0),
    },
    FoldsConfig: {"n_folds": at_least(2)},
    EnsembleConfig: {
        "batch_size": at_least(1),
        "device": device_name,
        "debug_train_volumes": at_least(0),
        "report_slices": at_least(0),
    },
}


def cross_checks(cfg: object) -> list[tuple[str, str]]:
    """(key, problem) of the checks that involve several keys, of a section or stage config just built."""
    out: list[tuple[str, str]] = []
    if isinstance(cfg, TrainCfg) and cfg.tracker_uri and cfg.tracker == "none":
        out.append(
            (
                "tracker_uri",
                f"= {cfg.tracker_uri!r} is set but train.tracker is none: set train.tracker: mlflow",
            )
        )
    if isinstance(cfg, ModelCfg):
        out += _start_weights_checks(cfg)
    if isinstance(cfg, SegConfig | ClsConfig):
        out += _member_checks(cfg)
    return out


def _member_checks(cfg: SegConfig | ClsConfig) -> list[tuple[str, str]]:
    """A segmenter's or classifier's loss, its 3D settings, and its input size against the encoder."""
    out = []
    if not any(getattr(cfg.loss, k) > 0 for k in ("bce", "dice", "tversky", "lovasz", "focal")):
        out.append(("loss", "every loss weight (bce, dice, tversky, lovasz, focal) is 0: set one > 0"))
    if isinstance(cfg, ClsConfig) and cfg.loss.lovasz > 0:
        out.append(("loss.lovasz", "applies to segmentation only: set it to 0 for a classifier"))
    if cfg.model.spatial_dims == 3:
        return out + _three_d_checks(cfg)
    if isinstance(cfg, SegConfig) or cfg.model.arch.lower() != "timm":
        # an smp encoder halves the input encoder_depth times (5 by default)
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


def _three_d_checks(cfg: SegConfig | ClsConfig) -> list[tuple[str, str]]:
    """A 3D member (``model.spatial_dims: 3``): a segmenter, NCDHW, no encoder to freeze, k = 0, and
    a MONAI network by name whose stride divides its patch and sliding-window sizes."""
    out = []
    if not isinstance(cfg, SegConfig):
        out.append(("model.spatial_dims", "= 3 is for segmenters only (a seg config)"))
    if cfg.train.channels_last:
        out.append(("train.channels_last", "must be false for a 3D member (the NHWC layout is 2D)"))
    if cfg.model.freeze_encoder:
        out.append(("model.freeze_encoder", "applies to smp encoders only: set it to 0 for a 3D member"))
    if cfg.data.k != 0:
        out.append(
            ("data.k", f"= {cfg.data.k} must be 0 for a 3D member: its depth axis holds the neighbours")
        )
    if not isinstance(cfg, SegConfig):
        return out
    try:
        arch = arch3d(cfg.model.arch)
    except ConfigError:
        return [
            *out,
            ("model.arch", f"= {cfg.model.arch!r} is not one of the 3D networks {', '.join(ARCHS_3D)}"),
        ]
    s3 = cfg.seg3d
    try:
        kwargs = network_kwargs(arch, s3.patch_size, cfg.model.kwargs)
        sizes = {"seg3d.patch_size": s3.patch_size, "seg3d.roi_size": s3.roi_size}
        return out + size_problems(arch, kwargs, sizes)
    except (
        KeyError,
        IndexError,
        TypeError,
        ValueError,
    ):  # malformed model.kwargs: building the network says how
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
