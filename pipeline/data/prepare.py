"""One preprocessing path for training and inference: volume -> network input and back.

For a volume ``image (S, H, W)`` and its crop ``box``:

1. every slice is cropped to the box and resized (or letterboxed) to ``data.img_size``
   (:class:`~pipeline.data.geometry.Geometry`), on raw intensities;
2. the 2.5D stack of slice ``i`` takes the prepared slices ``i - k*s ... i + k*s``, clamped
   at the volume ends (:func:`~pipeline.data.stack.neighbour_indices`);
3. intensities are divided by a robust scale (99.5th percentile) and clipped to [0, 1.5]:
   one scale per stack (``data.normalize: image``) or one per volume (``volume``), both taken
   on the network-size pixels.

Cropping and resizing commute with stacking (each slice is resized on its own) and with the
scalar normalisation, so doing them first prepares every slice once instead of ``2k+1`` times.
A training item (:func:`prepare_slice`) is the same computation restricted to one slice, and
equals the corresponding row of :func:`prepare_volume` exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import cv2
import numpy as np
import pandas as pd

from pipeline.config import DataCfg
from pipeline.data.boxes import load_boxes
from pipeline.data.geometry import CLIP, Box, Geometry, full_box, robust_scale
from pipeline.data.stack import neighbour_indices

log = logging.getLogger(__name__)


def geometry_for(shape: tuple[int, ...], box: Box, data_cfg: DataCfg) -> Geometry:
    """The crop/resize geometry of a volume of slice shape ``shape`` (H, W)."""
    size = (int(data_cfg.img_size[0]), int(data_cfg.img_size[1]))
    return Geometry((int(shape[0]), int(shape[1])), box, size, data_cfg.resize)


def prepare_planes(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(n, [C,] H, W) raw slices -> (n, [C,] Hn, Wn) float32 cropped and resized, not yet normalised."""
    return geometry.forward(np.asarray(image, dtype=np.float32))


VolumeScale = float | np.ndarray | None  # normalize volume: one number; channel: one per channel


def normalise_stacks(stacks: np.ndarray, mode: str, volume_scale: VolumeScale = None) -> np.ndarray:
    """(n, C, Hn, Wn) raw stacks -> scaled and clipped float32 (in place when possible).

    ``volume_scale``: the volume's scale (``volume``) or its per-channel scales (``channel``, tiled
    over the stack's ``2k+1`` slices, which keep their channels together).
    """
    n = stacks.shape[0]
    if mode in ("volume", "channel"):
        if volume_scale is None:
            raise ValueError(f"normalize='{mode}' needs the volume's volume_scale")
        per = np.atleast_1d(np.asarray(volume_scale, dtype=np.float32))
        scale = np.tile(per, stacks.shape[1] // per.size).reshape(1, -1, 1, 1)
    else:
        scale = np.asarray(robust_scale(stacks.reshape(n, -1), axis=1)).reshape(n, 1, 1, 1)
    out = np.divide(stacks, scale, dtype=np.float32)
    return np.clip(out, 0.0, CLIP, out=out)


def prepare_volume(image: np.ndarray, box: Box, data_cfg: DataCfg) -> tuple[np.ndarray, Geometry]:
    """(S, H, W) or (S, C, H, W) volume -> (x float32 (S, (2k+1)*C, Hn, Wn), Geometry) for the network.

    A multi-channel slice (LGG's three MR contrasts) keeps its channels together: the stack is
    ``[slice i-k*s (all channels), ..., slice i+k*s (all channels)]``.
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(
            f"prepare_volume expects a (S, H, W) or (S, C, H, W) volume, got shape {image.shape}"
        )
    geometry = geometry_for(image.shape[-2:], box, data_cfg)
    planes = prepare_planes(image, geometry)
    index = neighbour_indices(len(planes), data_cfg.k, data_cfg.stride)
    volume_scale = scale_of_planes(planes, data_cfg.normalize)
    stacks = planes[index].reshape(len(planes), -1, *planes.shape[-2:])  # (S, (2k+1)*C, Hn, Wn)
    return normalise_stacks(stacks, data_cfg.normalize, volume_scale), geometry


def scale_of_planes(planes: np.ndarray, mode: str) -> VolumeScale:
    """A volume's scale from its prepared (S, [C,] Hn, Wn) planes: one number (``normalize: volume``),
    one per channel (``channel``), or None (``image``: each stack scales itself)."""
    if mode == "volume":
        return float(robust_scale(planes))
    if mode == "channel":
        by_channel = planes[:, None] if planes.ndim == 3 else planes
        return np.asarray(
            robust_scale(np.moveaxis(by_channel, 1, 0).reshape(by_channel.shape[1], -1), axis=1)
        )
    return None


def volume_scale_of(image: np.ndarray, geometry: Geometry, mode: str) -> VolumeScale:
    """The per-volume scale of ``normalize: volume | channel`` (as :func:`prepare_volume` computes it)."""
    return scale_of_planes(prepare_planes(image, geometry), mode)


def prepare_slice(
    image: np.ndarray,
    index: int,
    geometry: Geometry,
    data_cfg: DataCfg,
    volume_scale: VolumeScale = None,
) -> np.ndarray:
    """((2k+1)*C, Hn, Wn) input of slice ``index``; equals ``prepare_volume(image, ...)[0][index]``.

    Reads only the ``2k+1`` slices it needs, so ``image`` can be a memory-mapped volume.
    """
    rows = neighbour_indices(image.shape[0], data_cfg.k, data_cfg.stride)[index]
    unique, inverse = np.unique(rows, return_inverse=True)
    planes = prepare_planes(image[unique], geometry)[inverse]
    stack = planes.reshape(1, -1, *planes.shape[-2:])  # (1, (2k+1)*C, Hn, Wn)
    return normalise_stacks(stack, data_cfg.normalize, volume_scale)[0]


def prepare_masks(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(S, classes, H, W) uint8 masks -> (S, classes, Hn, Wn) uint8 on the network grid (nearest)."""
    return geometry.forward(np.asarray(mask, dtype=np.uint8), interpolation=cv2.INTER_NEAREST)


def volume_shapes(catalog: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """(H, W) of every volume of a catalog."""
    first = catalog.drop_duplicates("volume_id")
    return {row.volume_id: (int(row.height), int(row.width)) for row in first.itertuples(index=False)}


def boxes_for(data_cfg: DataCfg, store_or_catalog: Any, split: str = "train") -> dict[str, Box]:
    """Crop box of every volume: the detector's boxes when ``data.crop``, else the full frame.

    ``store_or_catalog`` is a :class:`~pipeline.data.volumes.VolumeStore` or a catalog frame.
    """
    catalog = getattr(store_or_catalog, "catalog", store_or_catalog)
    shapes = volume_shapes(catalog)
    if not data_cfg.crop:
        return {volume_id: full_box(shape) for volume_id, shape in shapes.items()}
    boxes = load_boxes(data_cfg.det_config, split=split)
    missing = [d for d in shapes if d not in boxes]
    if missing:
        raise ValueError(
            f"detector run '{data_cfg.det_config}' has no {split} box for {len(missing)} volumes "
            f"(first {missing[0]}); run `make train-det` again on this dataset, or set data.crop=false"
        )
    out = {}
    for volume_id, shape in shapes.items():
        box = boxes[volume_id].clip(shape)
        out[volume_id] = box
    return out
