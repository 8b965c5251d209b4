"""The segmenter and classifier training tasks on top of the shared engine.

``train_segmenter(cfg, fold)`` / ``train_classifier(cfg, fold)``: read the fold
(:mod:`pipeline.train.fold_data`: folds, volume cache, crop boxes), build the training set, the model
and the loss, run :func:`engine.fit` into ``runs/<seg|cls>/<name>/fold_<k>/``, then write the
out-of-fold predictions of the validation volumes from ``best.pt`` (:mod:`pipeline.train.validation`,
which also gives the per-epoch metric). ``fold="all"`` trains on every volume without validation or
OOF. What differs between the segmenters and the classifier is one :class:`Task` record, not string
switches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.config import ClsConfig, MemberConfig, SegConfig, dump_config
from pipeline.data.augment import build_augment
from pipeline.data.torch_sets import SliceDataset
from pipeline.data.volume3d import PatchDataset
from pipeline.models.predict import build_model, is_3d
from pipeline.paths import run_dir
from pipeline.runtime import record_machine, seed_everything
from pipeline.train import distributed
from pipeline.train.checkpoint import load_weights
from pipeline.train.engine import fit
from pipeline.train.fold_data import Fold, FoldData, fold_seed, fold_weights, load_fold, make_loader
from pipeline.train.losses import build_loss
from pipeline.train.validation import Validate, cls_validator, seg_validator, write_cls_oof, write_seg_oof

log = logging.getLogger(__name__)

C = TypeVar("C", bound=MemberConfig)


def slice_dataset(with_masks: bool) -> Callable[[MemberConfig, FoldData, int], Dataset]:
    """The 2.5D training set of a fold: prepared slices with masks (segmenters) or presence (classifier)."""

    def make(cfg: MemberConfig, data: FoldData, seed: int) -> Dataset:
        return SliceDataset(
            data.store,
            data.train_volumes,
            data.boxes,
            cfg.data,
            with_masks=with_masks,
            augment=build_augment(cfg.augment),
            seed=seed,
            channel_dropout=cfg.data.channel_dropout,
        )

    return make


def patch_dataset(cfg: SegConfig, data: FoldData, seed: int) -> Dataset:
    """The 3D training set of a fold: patches of the cropped, resampled volumes (MONAI sampling)."""
    return PatchDataset(data.store, data.train_volumes, data.boxes, cfg, seed=seed)


def seg_oof_files(out_dir: Path, volumes: Sequence[str]) -> list[Path]:
    return [out_dir / "oof" / f"{v}.npz" for v in volumes]


def cls_oof_files(out_dir: Path, volumes: Sequence[str]) -> list[Path]:
    return [out_dir / "oof.csv"]


@dataclasses.dataclass(frozen=True)
class Task(Generic[C]):
    """What makes a segmenter or the slice classifier out of the one engine."""

    stage: str  # run folder: runs/<stage>/<config>/fold_<k>/
    loss_mode: str  # build_loss mode
    make_dataset: Callable[[C, FoldData, int], Dataset]  # (cfg, fold data, seed) -> training items
    validator: Callable[[C, FoldData, torch.device, bool], Validate]
    write_oof: Callable[[nn.Module, C, FoldData, Path, torch.device, bool], Path]
    oof_files: Callable[[Path, Sequence[str]], list[Path]]  # (run folder, validation volumes) -> files


# predict_volume runs a 3D member by sliding window: one validator, one OOF writer for both segmenters
SEG: Task[SegConfig] = Task(
    "seg", "multilabel", slice_dataset(True), seg_validator, write_seg_oof, seg_oof_files
)
SEG3D: Task[SegConfig] = dataclasses.replace(SEG, make_dataset=patch_dataset)
CLS: Task[ClsConfig] = Task(
    "cls", "binary", slice_dataset(False), cls_validator, write_cls_oof, cls_oof_files
)


def _train(cfg: C, fold: Fold, task: Task[C], progress: bool) -> Path:
    cfg = fold_weights(cfg, fold)
    seed = fold_seed(cfg, fold)
    device = distributed.process_device(cfg.train.device)  # under torchrun: this process's GPU
    progress = progress and distributed.is_main()
    data = load_fold(cfg, fold, progress)
    dataset = task.make_dataset(cfg, data, seed)
    seed_everything(seed)  # the initial weights depend on the fold's seed alone, not on what ran before
    model = build_model(cfg, data.store.spec)
    loss_fn = build_loss(cfg.loss, task.loss_mode)
    validate = task.validator(cfg, data, device, progress) if data.val_volumes else None
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
        written = all(p.is_file() for p in task.oof_files(out_dir, data.val_volumes))
        # under torchrun rank 0 writes the OOF; the others go on (they wait at the next collective)
        if distributed.is_main() and data.val_volumes and not (result.epochs_run == 0 and written):
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


def describe(cfg: MemberConfig) -> str:
    """One line for the logs: what is being trained."""
    d, t = cfg.data, cfg.train
    if is_3d(cfg):
        s3 = cfg.seg3d
        return (
            f"{cfg.stage} '{cfg.name}' ({cfg.dataset}): 3D {cfg.model.arch}, volumes cropped={d.crop} and resampled "
            f"in-plane to {d.img_size[0]}x{d.img_size[1]}, {s3.samples_per_volume} patches of "
            f"{'x'.join(map(str, s3.patch_size))} (slices x H x W) per volume, sliding window "
            f"{'x'.join(map(str, s3.roi_size))}, {t.epochs} epochs x batch {t.batch_size} volumes"
        )
    return (
        f"{cfg.stage} '{cfg.name}' ({cfg.dataset}): {cfg.model.arch}/{cfg.model.encoder}, {2 * d.k + 1}-slice input "
        f"(stride {d.stride}), {d.img_size[0]}x{d.img_size[1]} {d.resize}, crop={d.crop}, "
        f"{t.epochs} epochs x batch {t.batch_size}"
    )
