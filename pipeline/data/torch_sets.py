"""Torch datasets of prepared slices for the segmenters and the slice classifier.

An item is one slice of a volume, prepared by :func:`pipeline.data.prepare.prepare_slice`
(the same computation inference runs on the whole volume) from the memory-mapped cache:

- ``with_masks=True`` (segmenters): ``image`` (C, Hn, Wn) float32, ``target`` (classes, Hn, Wn)
  float32 masks on the network grid, ``id``;
- ``with_masks=False`` (the slice classifier): the same ``image``, ``target`` (classes,) float32
  presence of each class in the slice.

Which slices are items, and which (slice, class) labels are missing rather than empty, is
:func:`pipeline.data.labels.label_plan` (``data.train_on``, ``data.missing_labels``): the target of
an ignored class is :data:`~pipeline.data.labels.IGNORE` throughout (the whole map, after
augmentation), so the loss skips it.

Reproducible order: :class:`EpochSampler` yields ``(epoch, index)`` keys in an order drawn
from ``(seed, epoch)``, and the augmentation of an item is seeded from ``(seed, epoch, index)``,
so an epoch's batches do not depend on worker count or on what ran before (exact resume).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.config import ConfigError, DataCfg
from pipeline.data.augment import apply_augment, seed_augment
from pipeline.data.geometry import Box, Geometry
from pipeline.data.labels import IGNORE, label_plan
from pipeline.data.prepare import geometry_for, prepare_masks, prepare_slice, volume_scale_of
from pipeline.data.volumes import Volume, VolumeStore

log = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """Every index once per epoch, as ``(epoch, index)`` keys, shuffled from ``(seed, epoch)``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, int(i)) for i in self.order()])

    def __len__(self) -> int:
        return self.n


class _Volume:
    """What the dataset keeps of one volume: the memory-mapped arrays and their geometry."""

    def __init__(self, volume: Volume, box: Box, data_cfg: DataCfg) -> None:
        self.volume = volume
        self.geometry: Geometry = geometry_for(volume.shape, box, data_cfg)
        self.volume_scale = volume_scale_of(volume.image, self.geometry, data_cfg.normalize)


def _fill_channel(store: VolumeStore, channel_dropout: float) -> int | None:
    """The channel a dropped one becomes; channel dropout on a dataset without one is a config error."""
    if channel_dropout > 0 and store.spec.fill_channel is None:
        raise ConfigError(
            f"data.channel_dropout = {channel_dropout}: the {store.spec.name} dataset declares no "
            "fill channel to put in a dropped channel's place; set data.channel_dropout: 0"
        )
    return store.spec.fill_channel


class SliceDataset(Dataset):
    """Prepared 2.5D slices of some volumes of a :class:`VolumeStore` (see module doc)."""

    def __init__(
        self,
        store: VolumeStore,
        volume_ids: Sequence[str],
        boxes: dict[str, Box],
        data_cfg: DataCfg,
        *,
        with_masks: bool = True,
        augment: object | None = None,
        seed: int = 0,
        train_on: str | None = None,
        channel_dropout: float = 0.0,
    ) -> None:
        self.with_masks, self.cfg, self.augment, self.seed, self.epoch = (
            with_masks,
            data_cfg,
            augment,
            seed,
            0,
        )
        self.channels, self.fill_channel = store.spec.channels, _fill_channel(store, channel_dropout)
        self.channel_dropout = channel_dropout
        volume_ids = list(volume_ids)[: data_cfg.max_volumes]  # None: every volume
        missing = [v for v in volume_ids if v not in boxes]
        if missing:
            raise ValueError(f"no crop box for volume {missing[0]} ({len(missing)} missing)")
        train_on = train_on or data_cfg.train_on
        plan_cfg = dataclasses.replace(data_cfg, train_on=train_on)
        self.volumes: list[_Volume] = []
        table = store.spec.presence(store.catalog)
        n_classes = table.shape[1]
        rows, ids, targets, ignores = [], [], [], []
        for volume_id in volume_ids:
            volume = store[volume_id]
            present = table.loc[volume.ids].to_numpy(dtype=bool)
            plan = label_plan(present, plan_cfg, store.spec.classes)
            keep = np.flatnonzero(plan.keep)
            if keep.size == 0:
                continue
            volume_index = len(self.volumes)
            self.volumes.append(_Volume(volume, boxes[volume_id], data_cfg))
            rows += [(volume_index, int(p)) for p in keep]
            ids += [volume.ids[p] for p in keep]
            targets.append(present[keep])
            ignores.append(plan.ignore[keep])
        self.items = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        self.ids = ids
        empty = np.zeros((0, n_classes), bool)
        self.presence = np.concatenate(targets) if targets else empty  # (items, classes) bool
        self.ignore = np.concatenate(ignores) if ignores else empty  # (items, classes): target IGNORE
        log.info(
            "%s dataset: %d slices of %d volumes (train_on=%s, missing_labels=%s), %.0f%% labelled, "
            "%d class maps ignored",
            "mask" if with_masks else "presence",
            len(self.ids),
            len(self.volumes),
            train_on,
            data_cfg.missing_labels,
            100 * float(self.presence.any(axis=1).mean()) if len(self.ids) else 0.0,
            int(self.ignore.sum()),
        )

    def _drop_channels(self, image: np.ndarray, epoch: int, index: int) -> np.ndarray:
        """Each channel but the fill channel replaced by it with probability ``channel_dropout``, the same
        way in all ``2k+1`` slices of the stack (reproducible: drawn from the seed, epoch and item)."""
        rng = np.random.default_rng([self.seed, epoch, index, 17])
        fill, n = self.fill_channel, self.channels
        for c in range(n):
            if c != fill and rng.random() < self.channel_dropout:
                image[c::n] = image[fill::n]
        return image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _key(self, key: int | tuple[int, int] | torch.Tensor) -> tuple[int, int]:
        if isinstance(key, (tuple, list)) or (isinstance(key, torch.Tensor) and key.ndim == 1):
            epoch, index = (int(v) for v in key)
            return epoch, index
        return self.epoch, int(key)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, object]:
        epoch, index = self._key(key)
        volume_index, pos = self.items[index]
        item = self.volumes[volume_index]
        image = prepare_slice(item.volume.image, pos, item.geometry, self.cfg, item.volume_scale)
        if self.channel_dropout > 0:
            image = self._drop_channels(image, epoch, index)
        mask = None
        if self.with_masks:
            mask = prepare_masks(item.volume.mask[pos][None], item.geometry)[0]
        if self.augment is not None:
            seed_augment(self.augment, [self.seed, epoch, index])
            image, mask = apply_augment(self.augment, image, mask)
        target = mask.astype(np.float32) if mask is not None else self.presence[index].astype(np.float32)
        target[self.ignore[index]] = IGNORE  # whole maps (or presences) of the missing classes
        return {"image": torch.from_numpy(image), "target": torch.from_numpy(target), "id": self.ids[index]}
