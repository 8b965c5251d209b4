"""The 3D member's data: whole volumes on the network grid, and patches sampled from them by MONAI.

A volume ``(S, [C,] H, W)`` goes through the same preparation as the 2.5D members
(:func:`pipeline.data.prepare.prepare_volume` with ``k = 0``: cropped to the detector's box,
resized in-plane to ``data.img_size``, scaled), its slices kept, and is laid out for a 3D network
as ``(C, S, Hn, Wn)`` (depth first, as torch's ``Conv3d`` expects). Masks follow on the same grid
(nearest), with the labels that ``data.missing_labels`` marks as missing set to
:data:`~pipeline.data.labels.IGNORE`.

Training items (:class:`PatchDataset`) are volumes: each visit draws ``seg3d.samples_per_volume``
patches of ``seg3d.patch_size`` with MONAI's ``RandCropByPosNegLabel`` (patch centres on a
labelled voxel with odds ``pos : neg``), then the config's MONAI dictionary transforms
(``augment``: ``RandFlipd``, ``RandAffined``, ``RandScaleIntensityd``, ...). Every random draw of
an item is seeded from ``(seed, epoch, index)``, so an epoch does not depend on workers or resume.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.config import AugSpec, DataCfg, SegConfig
from pipeline.data.augment import AugmentError
from pipeline.data.geometry import Box, Geometry
from pipeline.data.labels import IGNORE, label_plan
from pipeline.data.prepare import prepare_masks, prepare_volume
from pipeline.data.volumes import VolumeStore

log = logging.getLogger(__name__)

KEYS = ("image", "label")


def to_depth_first(x: np.ndarray) -> np.ndarray:
    """(S, C, H, W) -> (C, S, H, W) (contiguous)."""
    return np.ascontiguousarray(np.moveaxis(x, 0, 1))


def prepare_volume3d(image: np.ndarray, box: Box, data: DataCfg) -> tuple[np.ndarray, Geometry]:
    """A volume -> (x float32 (C, S, Hn, Wn), Geometry); ``geometry.inverse`` maps (S, ...) planes back."""
    x, geometry = prepare_volume(image, box, data)  # k = 0: (S, C, Hn, Wn)
    return to_depth_first(x), geometry


def _seed_of(parts: Sequence[int]) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] % (2**31 - 1))


def build_augment3d(specs: Sequence[AugSpec]) -> Any | None:
    """A MONAI ``Compose`` of dictionary transforms by class name, or None when there are none.

    ``keys`` are filled in: intensity transforms get the image only, spatial ones the image and the
    label (with nearest interpolation for the label where the transform has a ``mode``).
    """
    import monai.transforms as mt

    transforms = []
    for i, spec in enumerate(specs):
        where = f"augment[{i}]"
        cls: Any = getattr(mt, spec.name, None)
        if cls is None or not inspect.isclass(cls) or not spec.name.endswith("d"):
            raise AugmentError(
                f"{where}: '{spec.name}' is not a MONAI dictionary transform (e.g. RandFlipd, RandAffined, "
                "RandScaleIntensityd, RandShiftIntensityd, RandGaussianNoised): a 3D member's augment list names those"
            )
        params = dict(spec.params)
        accepted = inspect.signature(cls.__init__).parameters
        unknown = [k for k in params if k not in accepted]
        if unknown or "keys" in params:
            raise AugmentError(
                f"{where} ({spec.name}): unknown or reserved arguments {unknown or ['keys']}; "
                f"accepted: {', '.join(k for k in accepted if k not in ('self', 'keys'))}"
            )
        intensity = ".intensity." in cls.__module__
        keys = KEYS[:1] if intensity else KEYS
        if not intensity and "mode" in accepted and "mode" not in params:
            params["mode"] = ("bilinear", "nearest")
        make: Any = cls  # a MONAI transform class, found by name above
        try:
            transforms.append(make(keys=keys, **params))
        except (TypeError, ValueError) as exc:
            raise AugmentError(f"{where} ({spec.name}): {exc}") from None
    return mt.Compose(transforms) if transforms else None


class _Volume:
    """What the dataset keeps of one training volume."""

    def __init__(self, volume_id: str, box: Box, end: int, ignore: np.ndarray) -> None:
        self.volume_id, self.box, self.end, self.ignore = volume_id, box, end, ignore


class PatchDataset(Dataset):
    """Patches of prepared volumes for a 3D member (see the module doc); an item is one volume's patches.

    ``item["image"]`` is (n, C, D, H, W) and ``item["target"]`` (n, classes, D, H, W) float32 with
    ``n = seg3d.samples_per_volume``; :meth:`collate_fn` concatenates items along the first axis.
    """

    def __init__(
        self,
        store: VolumeStore,
        volume_ids: Sequence[str],
        boxes: dict[str, Box],
        cfg: SegConfig,
        *,
        seed: int = 0,
    ) -> None:
        self.store, self.cfg, self.seed, self.epoch = store, cfg, seed, 0
        self.augment = build_augment3d(cfg.augment)
        volume_ids = list(volume_ids)[: cfg.data.max_volumes]  # None: every volume
        missing = [v for v in volume_ids if v not in boxes]
        if missing:
            raise ValueError(f"no crop box for volume {missing[0]} ({len(missing)} missing)")
        table = store.spec.presence(store.catalog)
        self.volumes: list[_Volume] = []
        for volume_id in volume_ids:
            volume = store[volume_id]
            present = table.loc[volume.ids].to_numpy(dtype=bool)
            plan = label_plan(present, _all_slices(cfg), store.spec.classes)
            kept = np.flatnonzero(plan.keep)
            if kept.size == 0:
                continue
            end = int(kept[-1]) + 1  # "drop" cuts the tail; a dropped slice inside stays, without loss
            ignore = plan.ignore[:end].copy()
            ignore[~plan.keep[:end]] = True
            self.volumes.append(_Volume(volume_id, boxes[volume_id], end, ignore))
        log.info(
            "patch dataset: %d volumes, %d patches of %s per visit (missing_labels=%s)",
            len(self.volumes),
            cfg.seg3d.samples_per_volume,
            "x".join(map(str, cfg.seg3d.patch_size)),
            cfg.data.missing_labels,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.volumes)

    def prepared(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, S, Hn, Wn), target (classes, S, Hn, Wn) float32 with IGNORE) of volume ``index``."""
        item = self.volumes[index]
        volume = self.store[item.volume_id]
        if volume.mask is None:
            raise ValueError(f"{item.volume_id} has no masks: a 3D member trains on labelled volumes")
        image, geometry = prepare_volume3d(volume.image[: item.end], item.box, self.cfg.data)
        mask = prepare_masks(volume.mask[: item.end], geometry).astype(np.float32)  # (S, classes, Hn, Wn)
        mask[item.ignore] = IGNORE
        return image, to_depth_first(mask)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from monai.transforms import RandCropByPosNegLabel, SpatialPad

        if isinstance(key, (tuple, list)) or (isinstance(key, torch.Tensor) and key.ndim == 1):
            epoch, index = (int(v) for v in key)
        else:
            epoch, index = self.epoch, int(key)
        s3 = self.cfg.seg3d
        image, target = self.prepared(index)
        pad: Any = SpatialPad(s3.patch_size)  # volumes shallower or smaller than a patch are zero-padded
        image, target = np.asarray(pad(image)), np.asarray(pad(target))  # MONAI takes NumPy arrays too
        crop = RandCropByPosNegLabel(
            s3.patch_size,
            label=(target > 0).any(axis=0, keepdims=True),  # type: ignore[arg-type]  # an array works too
            pos=s3.pos,
            neg=s3.neg,
            num_samples=s3.samples_per_volume,
            allow_smaller=True,
        )
        crop.set_random_state(_seed_of([self.seed, epoch, index, 0]))
        images = crop(torch.from_numpy(image), randomize=True)
        targets = crop(torch.from_numpy(target), randomize=False)
        pairs = []
        for j, (x, y) in enumerate(zip(images, targets)):
            sample = {"image": torch.as_tensor(x).float(), "label": torch.as_tensor(y).float()}
            if self.augment is not None:
                self.augment.set_random_state(_seed_of([self.seed, epoch, index, j + 1]))
                sample = self.augment(sample)
            pairs.append(tuple(torch.as_tensor(sample[k]).as_subclass(torch.Tensor).float() for k in KEYS))
        return {
            "image": torch.stack([p[0] for p in pairs]),
            "target": torch.stack([p[1] for p in pairs]),
            "id": self.volumes[index].volume_id,
        }

    @staticmethod
    def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
        """Items of n patches each -> one batch of ``len(items) * n`` patches."""
        return {
            "image": torch.cat([it["image"] for it in items]),
            "target": torch.cat([it["target"] for it in items]),
            "id": [it["id"] for it in items],
        }


def _all_slices(cfg: SegConfig) -> DataCfg:
    """The data section with ``train_on: all``: a volume is used whole (its tail cut by ``drop``)."""
    return dataclasses.replace(cfg.data, train_on="all")
