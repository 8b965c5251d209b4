"""The config schema: every section and stage config as a frozen dataclass with its documented defaults.

A config file is a small delta over these defaults (:mod:`pipeline.config.loader`); ``stage`` picks the
schema (:data:`SCHEMAS`). Value ranges and the checks across keys are :mod:`pipeline.config.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    # percentile scaling: "image" (each slice), "volume" (each volume) or "channel" (each channel of
    # each volume: LGG's three MR contrasts have unrelated ranges)
    normalize: str = "image"
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
    max_volumes: int | None = None  # cap on training volumes (tests and smoke runs)
    # training only: each channel other than the dataset's fill channel is replaced by it with this
    # probability (LGG: a missing pre- or post-contrast is a copy of FLAIR in the real data)
    channel_dropout: float = 0.0


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
    slices_per_volume: int = 12  # slices sampled per volume for the YOLO dataset
    val_fraction: float = 0.2
    conf: float = 0.25
    margin: float = 0.05  # padding of the volume box, fraction of the image side
    threshold_quantile: float = 0.9  # body threshold: this quantile of non-zero pixels, scaled
    threshold_scale: float = 0.25  # (the median failed where noisy background is most of the frame)
    workers: int = 0
    device: str = "auto"
    seed: int = 42
    predict_step: int = 1  # detect on every n-th slice of a volume (its box barely changes)
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
    # components smaller than f x the largest removed (1: the largest only; 0 = off): candidates of f
    component_fractions: tuple[float, ...] = (0.0,)
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
class StageConfig:
    """What every stage config has: its name (the file stem: the run folder), schema and dataset."""

    name: str = ""
    stage: str = ""
    dataset: str = "uwmgi"  # the dataset plug-in (pipeline/datasets/<name>.py)


@dataclass(frozen=True)
class FoldsConfig(StageConfig):
    name: str = "folds"
    stage: str = "folds"
    data_dir: str | None = None
    n_folds: int = 5
    seed: int = 42
    exclude_volumes: tuple[str, ...] = ()  # volumes with known label faults (the dataset declares them)


@dataclass(frozen=True)
class DetConfig(StageConfig):
    stage: str = "det"
    data: DataCfg = field(default_factory=DataCfg)
    det: DetParams = field(default_factory=DetParams)


@dataclass(frozen=True)
class ClsConfig(StageConfig):
    stage: str = "cls"
    data: DataCfg = field(default_factory=lambda: DataCfg(train_on="all"))
    model: ModelCfg = field(default_factory=lambda: ModelCfg(arch="timm", encoder="resnet18"))
    train: TrainCfg = field(default_factory=TrainCfg)
    loss: LossCfg = field(default_factory=lambda: LossCfg(bce=1.0, dice=0.0))
    augment: tuple[AugSpec, ...] = ()


@dataclass(frozen=True)
class SegConfig(StageConfig):
    stage: str = "seg"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    augment: tuple[AugSpec, ...] = ()
    seg3d: Seg3DCfg = field(default_factory=Seg3DCfg)  # the 3D member (model.spatial_dims: 3)
    # the views of the out-of-fold probabilities: set it to the ensemble's `tta` so that `make tune`
    # decides thresholds on maps as soft as those `make submit` averages (default: the plain view)
    oof_tta: TTACfg = field(default_factory=lambda: TTACfg(hflip=False))


@dataclass(frozen=True)
class EnsembleConfig(StageConfig):
    stage: str = "ensemble"
    data_dir: str | None = None
    members: tuple[MemberCfg, ...] = ()
    classifier: str | None = None  # cls config whose OOF/weights gate the slices; None: no gate
    det_config: str | None = None  # detector run for crops at submit; None: members' own setting
    tta: TTACfg = field(default_factory=TTACfg)
    tune: TuneCfg = field(default_factory=TuneCfg)
    batch_size: int = 16
    device: str = "auto"
    amp: bool = True
    debug_train_volumes: int = 0  # >0: run submit over this many train volumes (Kaggle debug switch)
    report_slices: int = 6  # overlay figures drawn by `make cv`


SCHEMAS: dict[str, type[StageConfig]] = {
    "folds": FoldsConfig,
    "det": DetConfig,
    "cls": ClsConfig,
    "seg": SegConfig,
    "ensemble": EnsembleConfig,
}

Config = FoldsConfig | DetConfig | ClsConfig | SegConfig | EnsembleConfig
MemberConfig = SegConfig | ClsConfig  # a trained network of an ensemble: a segmenter or the slice classifier
