"""What one fold's training reads: its train and validation volumes, the volume cache, the crop boxes.

Also the fold arithmetic the stages share (``--folds`` parsing, every fold of a dataset, a fold's seed,
fold-wise starting weights) and the training loader (an ``(epoch, index)`` order drawn from the seed,
sharded under torchrun).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sized
from typing import TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import ConfigError, MemberConfig
from pipeline.data.folds import fold_numbers, fold_volumes, read_folds
from pipeline.data.geometry import Box
from pipeline.data.prepare import boxes_for
from pipeline.data.volumes import VolumeStore
from pipeline.datasets import get_dataset
from pipeline.paths import data_dir, runs_dir
from pipeline.train import distributed

log = logging.getLogger(__name__)

Fold = int | str
C = TypeVar("C", bound=MemberConfig)


@dataclasses.dataclass
class FoldData:
    """Everything a fold's training needs from the dataset."""

    store: VolumeStore
    train_volumes: list[str]
    val_volumes: list[str]
    boxes: dict[str, Box]


def train_store(cfg: MemberConfig, progress: bool = True) -> VolumeStore:
    """The cached train volumes of the config's dataset, built (decoded once) on first use."""
    spec = get_dataset(cfg.dataset)
    root = data_dir(cfg.data.data_dir, cfg.dataset)
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    store.build(progress=progress)
    return store


def load_fold(cfg: MemberConfig, fold: Fold, progress: bool = True) -> FoldData:
    """Folds, the cached volumes (built on first use) and the crop boxes of a fold."""
    root = data_dir(cfg.data.data_dir, cfg.dataset)
    folds = read_folds(root)
    train_volumes, val_volumes = fold_volumes(folds, fold)
    store = train_store(cfg, progress)
    boxes = boxes_for(cfg.data, store, "train")
    log.info("fold %s: %d train volumes, %d validation volumes", fold, len(train_volumes), len(val_volumes))
    return FoldData(store, train_volumes, val_volumes, boxes)


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


def every_fold(cfg: MemberConfig) -> list[int]:
    """Every fold of the config's dataset (``$DATA_DIR/folds.csv``), in order."""
    return fold_numbers(read_folds(data_dir(cfg.data.data_dir, cfg.dataset)))


def fold_seed(cfg: MemberConfig, fold: Fold) -> int:
    """``train.seed + fold`` (``train.seed`` for the all-data run)."""
    return cfg.train.seed + (0 if str(fold) == "all" else int(fold))


def fold_weights(cfg: C, fold: Fold) -> C:
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


def make_loader(dataset: Dataset, cfg: MemberConfig, seed: int, device: torch.device) -> DataLoader:
    """Shuffled batches in an order drawn from (seed, epoch); full batches only when there are enough.

    Under torchrun this process's share of every global batch (``train.batch_size`` per process).
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"the training set of '{cfg.name}' has no length")
    if len(dataset) == 0:
        raise ValueError(
            f"no training slices for '{cfg.name}' (data.train_on={cfg.data.train_on}, "
            f"data.max_volumes={cfg.data.max_volumes}); check the folds and labels"
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
