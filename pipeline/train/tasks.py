"""The segmenter and classifier training tasks on top of the shared engine.

``train_segmenter(cfg, fold)`` / ``train_classifier(cfg, fold)``: read the folds, build the
volume cache, the crop boxes, the datasets, the model and the loss, run :func:`engine.fit`
into ``runs/<seg|cls>/<name>/fold_<k>/``, then write the out-of-fold predictions of the
validation days from ``best.pt``:

- seg: ``oof/<volume_id>.npz`` with ``probs`` uint8 (S, classes, H, W) = round(p * 255) in the
  original geometry and ``ids`` (S,), no TTA;
- cls: ``oof.csv`` with ``id, volume_id`` and one probability column per class.

Validation each epoch runs the inference code (:mod:`pipeline.models.predict`) on every
validation volume: seg scores the 0.5-thresholded masks with the dataset's metric, cls reports
per-class ROC AUC and accuracy. ``fold="all"`` trains on every volume without validation or OOF.
What differs between the two is one :class:`Task` record, not string switches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.config import ClsConfig, ConfigError, SegConfig, dump_config
from pipeline.data.augment import build_augment
from pipeline.data.datasets import SliceDataset
from pipeline.data.folds import fold_days, fold_numbers, read_folds
from pipeline.data.geometry import Box
from pipeline.data.prepare import boxes_for
from pipeline.data.volume3d import PatchDataset
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.io import write_csv, write_with
from pipeline.models.predict import build_model, predict_day, predict_day_cls
from pipeline.paths import data_dir, run_dir, runs_dir
from pipeline.runtime import record_machine, seed_everything
from pipeline.train import distributed
from pipeline.train.checkpoint import load_weights
from pipeline.train.engine import fit
from pipeline.train.losses import build_loss

log = logging.getLogger(__name__)

THRESHOLD = 0.5  # validation only; the submission thresholds are tuned on OOF by `make tune`
Fold = int | str


@dataclasses.dataclass
class FoldData:
    """Everything a fold's training needs from the dataset."""

    store: VolumeStore
    train_days: list[str]
    val_days: list[str]
    boxes: dict[str, Box]


def train_store(cfg: SegConfig | ClsConfig, progress: bool = True) -> VolumeStore:
    """The cached train volumes of the config's dataset, built (decoded once) on first use."""
    spec = get_dataset(cfg.dataset)
    root = data_dir(cfg.data.data_dir, cfg.dataset)
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    store.build(progress=progress)
    return store


def load_fold(cfg: SegConfig | ClsConfig, fold: Fold, progress: bool = True) -> FoldData:
    """Folds, the cached volumes (built on first use) and the crop boxes of a fold."""
    root = data_dir(cfg.data.data_dir, cfg.dataset)
    folds = read_folds(root)
    train_days, val_days = fold_days(folds, fold)
    store = train_store(cfg, progress)
    boxes = boxes_for(cfg.data, store, "train")
    log.info("fold %s: %d train days, %d validation days", fold, len(train_days), len(val_days))
    return FoldData(store, train_days, val_days, boxes)


def parse_folds(items: list[str]) -> list[Fold]:
    """``["0", "2"]`` -> [0, 2]; ``["all"]`` -> ["all"] (the all-data run); anything else fails."""
    folds: list[Fold] = []
    for item in items:
        text = str(item).strip()
        if text == "all":
            folds.append("all")
        elif text.isdigit():
            folds.append(int(text))
        else:
            raise ValueError(f"--folds: '{item}' is neither a fold number nor 'all'")
    return list(dict.fromkeys(folds))


def every_fold(cfg: SegConfig | ClsConfig) -> list[int]:
    """Every fold of the config's dataset (``$DATA_DIR/folds.csv``), in order."""
    return fold_numbers(read_folds(data_dir(cfg.data.data_dir, cfg.dataset)))


def fold_seed(cfg: SegConfig | ClsConfig, fold: Fold) -> int:
    """``train.seed + fold`` (``train.seed`` for the all-data run)."""
    return cfg.train.seed + (0 if str(fold) == "all" else int(fold))


def make_loader(dataset: Dataset, cfg: SegConfig | ClsConfig, seed: int, device: torch.device) -> DataLoader:
    """Shuffled batches in an order drawn from (seed, epoch); full batches only when there are enough.

    Under torchrun this process's share of every global batch (``train.batch_size`` per process).
    """
    if len(dataset) == 0:
        raise ValueError(
            f"no training slices for '{cfg.name}' (data.train_on={cfg.data.train_on}, "
            f"data.max_days={cfg.data.max_days}); check the folds and labels"
        )
    batch_size = cfg.train.batch_size
    workers = cfg.train.num_workers
    full = len(dataset) >= batch_size * distributed.world_size()  # a last batch of one breaks batch norm
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=distributed.sampler_for(len(dataset), seed, drop_last=full),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=full,
        persistent_workers=False,  # workers see each epoch's set_epoch
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=getattr(dataset, "collate_fn", None),  # a 3D item holds several patches
    )


# --------------------------------------------------------------------------- validation


def seg_validator(
    cfg: SegConfig, data: FoldData, device: torch.device, progress: bool = True
) -> Callable[[nn.Module, int], dict]:
    """Per epoch: every validation volume through ``predict_day``, masks at 0.5, the dataset's metric."""
    spec = data.store.spec
    batch_size = cfg.train.val_batch_size or cfg.train.batch_size

    def validate(model: nn.Module, epoch: int) -> dict[str, float]:
        stats = []
        days = tqdm(data.val_days, desc=f"validate {epoch}", unit="day", leave=False, disable=not progress)
        for volume_id in days:
            volume = data.store[volume_id]
            probs = predict_day(
                model,
                cfg,
                volume.image,
                data.boxes[volume_id],
                device=device,
                batch_size=batch_size,
                amp=cfg.train.amp,
            )
            stats.append(spec.fast_stats(probs > THRESHOLD, np.asarray(volume.mask, dtype=bool)))
        result = spec.aggregate(stats)
        return {key: result[key] for key in spec.metric_keys}

    return validate


def cls_metrics(truth: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """Per-class ROC AUC (NaN for a class with one label value) and accuracy at 0.5.

    ``score`` is the mean AUC over the classes where it is defined; the mean accuracy when none is.
    """
    from sklearn.metrics import roc_auc_score

    out: dict[str, float] = {}
    aucs, accs = [], []
    for c, name in enumerate(classes):
        t, p = truth[:, c].astype(bool), probs[:, c]
        auc = float(roc_auc_score(t, p)) if 0 < t.sum() < len(t) else math.nan
        acc = float(((p > THRESHOLD) == t).mean()) if len(t) else math.nan
        out[f"auc_{name}"], out[f"acc_{name}"] = auc, acc
        aucs += [auc] if math.isfinite(auc) else []
        accs.append(acc)
    out["acc"] = float(np.mean(accs))
    out["score"] = float(np.mean(aucs)) if aucs else out["acc"]
    return out


def cls_predictions(model: nn.Module, cfg: ClsConfig, data: FoldData, device: torch.device) -> pd.DataFrame:
    """OOF table of the validation volumes: id, volume_id, one probability column per class, truth."""
    classes = data.store.spec.classes
    batch_size = cfg.train.val_batch_size or cfg.train.batch_size
    frames = []
    for volume_id in data.val_days:
        volume = data.store[volume_id]
        probs = predict_day_cls(
            model,
            cfg,
            volume.image,
            data.boxes[volume_id],
            device=device,
            batch_size=batch_size,
            amp=cfg.train.amp,
        )
        frame = pd.DataFrame(probs, columns=list(classes))
        frame.insert(0, "volume_id", volume_id)
        frame.insert(0, "id", volume.ids)
        truth = data.store.spec.presence_of(data.store.catalog, volume.ids)
        for c, name in enumerate(classes):
            frame[f"truth_{name}"] = truth[:, c]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def cls_validator(
    cfg: ClsConfig, data: FoldData, device: torch.device, progress: bool = True
) -> Callable[[nn.Module, int], dict]:
    classes = data.store.spec.classes

    def validate(model: nn.Module, epoch: int) -> dict[str, float]:
        frame = cls_predictions(model, cfg, data, device)
        truth = frame[[f"truth_{c}" for c in classes]].to_numpy()
        return cls_metrics(truth, frame[list(classes)].to_numpy(), classes)

    return validate


# --------------------------------------------------------------------------- OOF


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    return write_with(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def write_seg_oof(
    model: nn.Module,
    cfg: SegConfig,
    data: FoldData,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> Path:
    """``oof/<volume_id>.npz`` (probs uint8 (S, classes, H, W), ids) for every validation volume."""
    folder = out_dir / "oof"
    batch_size = cfg.train.val_batch_size or cfg.train.batch_size
    for volume_id in tqdm(data.val_days, desc="oof", unit="day", disable=not progress):
        volume = data.store[volume_id]
        probs = predict_day(
            model,
            cfg,
            volume.image,
            data.boxes[volume_id],
            device=device,
            batch_size=batch_size,
            amp=cfg.train.amp,
        )
        probs_u8 = np.rint(np.clip(probs, 0.0, 1.0) * 255).astype(np.uint8)
        _save_npz(folder / f"{volume_id}.npz", probs=probs_u8, ids=np.asarray(volume.ids))
    return folder


def write_cls_oof(
    model: nn.Module,
    cfg: ClsConfig,
    data: FoldData,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> Path:
    frame = cls_predictions(model, cfg, data, device)
    return write_csv(out_dir / "oof.csv", frame[["id", "volume_id", *data.store.spec.classes]])


# --------------------------------------------------------------------------- tasks


def slice_dataset(with_masks: bool) -> Callable[[SegConfig | ClsConfig, FoldData, int], Dataset]:
    """The 2.5D training set of a fold: prepared slices with masks (segmenters) or presence (classifier)."""

    def make(cfg: SegConfig | ClsConfig, data: FoldData, seed: int) -> Dataset:
        return SliceDataset(
            data.store,
            data.train_days,
            data.boxes,
            cfg.data,
            with_masks=with_masks,
            augment=build_augment(cfg.augment),
            seed=seed,
        )

    return make


def patch_dataset(cfg: SegConfig, data: FoldData, seed: int) -> Dataset:
    """The 3D training set of a fold: patches of the cropped, resampled volumes (MONAI sampling)."""
    return PatchDataset(data.store, data.train_days, data.boxes, cfg, seed=seed)


@dataclasses.dataclass(frozen=True)
class Task:
    """What makes a segmenter or the slice classifier out of the one engine."""

    stage: str  # run folder: runs/<stage>/<config>/fold_<k>/
    loss_mode: str  # build_loss mode
    make_dataset: Callable[[Any, FoldData, int], Dataset]  # (cfg, fold data, seed) -> training items
    validator: Callable[..., Callable[[nn.Module, int], dict]]
    write_oof: Callable[..., Path]
    oof_files: Callable[[Path, FoldData], list[Path]]


SEG = Task(
    "seg",
    "multilabel",
    slice_dataset(with_masks=True),
    seg_validator,  # predict_day runs a 3D member by sliding window: one validator, one OOF writer
    write_seg_oof,
    lambda out, data: [out / "oof" / f"{d}.npz" for d in data.val_days],
)
SEG3D = dataclasses.replace(SEG, make_dataset=patch_dataset)
CLS = Task(
    "cls",
    "binary",
    slice_dataset(with_masks=False),
    cls_validator,
    write_cls_oof,
    lambda out, data: [out / "oof.csv"],
)
TASKS = {"seg": SEG, "seg3d": SEG3D, "cls": CLS}


def fold_weights(cfg: SegConfig | ClsConfig, fold: Fold) -> SegConfig | ClsConfig:
    """``model.pretrained_path`` with ``{fold}`` and ``{runs}`` filled in (fold-wise fine-tuning).

    ``runs/seg/full_seg3d_segresnet/fold_{fold}/best.pt`` starts each fold of a second stage (the
    1st place's 224x224x80 fine-tuning) from the same fold of the first, never from weights that
    saw the fold's validation volumes.
    """
    path = cfg.model.pretrained_path
    if not path or "{" not in path:
        return cfg
    try:
        filled = path.format(fold=fold, runs=runs_dir())
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"config key 'model.pretrained_path' = {path!r}: only {{fold}} and {{runs}} may be filled in ({exc})"
        ) from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_path=filled))


def _train(cfg: SegConfig | ClsConfig, fold: Fold, task: Task, progress: bool) -> Path:
    cfg = fold_weights(cfg, fold)
    seed = fold_seed(cfg, fold)
    device = distributed.process_device(cfg.train.device)  # under torchrun: this process's GPU
    progress = progress and distributed.is_main()
    data = load_fold(cfg, fold, progress)
    dataset = task.make_dataset(cfg, data, seed)
    seed_everything(seed)  # the initial weights depend on the fold's seed alone, not on what ran before
    model = build_model(cfg)
    loss_fn = build_loss(cfg.loss, task.loss_mode)
    validate = task.validator(cfg, data, device, progress) if data.val_days else None
    out_dir = run_dir(task.stage, cfg.name, fold)
    with distributed.main_lock(out_dir):  # make train-seg started twice must not write one folder twice
        result = fit(
            model,
            make_loader(dataset, cfg, seed, device),
            loss_fn,
            dataclasses.replace(cfg.train, seed=seed),
            out_dir,
            validate=validate,
            config_text=record_machine(dump_config(cfg)),
            device=device,
            progress=progress,
        )
        log.info("%s: best epoch %d, score %s", out_dir, result.best_epoch, result.best_score)
        written = all(p.is_file() for p in task.oof_files(out_dir, data))
        # under torchrun rank 0 writes the OOF; the others go on (they wait at the next collective)
        if distributed.is_main() and data.val_days and not (result.epochs_run == 0 and written):
            load_weights(out_dir / "best.pt", model, map_location=device)
            model.to(device).eval()
            log.info(
                "wrote out-of-fold predictions %s",
                task.write_oof(model, cfg, data, out_dir, device, progress),
            )
    return out_dir


def train_segmenter(cfg: SegConfig, fold: Fold, progress: bool = True) -> Path:
    """Train one fold (or ``"all"``) of a segmenter; returns its run folder."""
    if cfg.stage != "seg":
        raise ValueError(f"train_segmenter needs a seg config, got a '{cfg.stage}' config ({cfg.name})")
    return _train(cfg, fold, SEG3D if cfg.model.spatial_dims == 3 else SEG, progress)


def train_classifier(cfg: ClsConfig, fold: Fold, progress: bool = True) -> Path:
    """Train one fold (or ``"all"``) of the slice classifier; returns its run folder."""
    if cfg.stage != "cls":
        raise ValueError(f"train_classifier needs a cls config, got a '{cfg.stage}' config ({cfg.name})")
    return _train(cfg, fold, CLS, progress)


def describe(cfg: Any) -> str:
    """One line for the logs: what is being trained."""
    d = cfg.data
    if getattr(cfg.model, "spatial_dims", 2) == 3:
        s3 = cfg.seg3d
        return (
            f"{cfg.stage} '{cfg.name}' ({cfg.dataset}): 3D {cfg.model.arch}, volumes cropped={d.crop} and resampled "
            f"in-plane to {d.img_size[0]}x{d.img_size[1]}, {s3.samples_per_volume} patches of "
            f"{'x'.join(map(str, s3.patch_size))} (slices x H x W) per volume, sliding window "
            f"{'x'.join(map(str, s3.roi_size))}, {cfg.train.epochs} epochs x batch {cfg.train.batch_size} volumes"
        )
    return (
        f"{cfg.stage} '{cfg.name}' ({cfg.dataset}): {cfg.model.arch}/{cfg.model.encoder}, {2 * d.k + 1}-slice input "
        f"(stride {d.stride}), {d.img_size[0]}x{d.img_size[1]} {d.resize}, crop={d.crop}, "
        f"{cfg.train.epochs} epochs x batch {cfg.train.batch_size}"
    )
