"""A network on one volume: prepared input, batched forward, TTA, paste-back.

Used by the per-epoch validation of training, by the out-of-fold writer and by submit, so
that a member is always evaluated the way it will be applied. Each TTA view (a flip
combination and a scale) is inverted (flipped back, resized back to the network size) before
the sigmoid probabilities are averaged; the mean goes back to the original slice geometry
with :meth:`Geometry.inverse`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ClsConfig, DataCfg, MemberConfig, Seg3DCfg, SegConfig, TTACfg
from pipeline.data.geometry import Box
from pipeline.data.prepare import prepare_volume
from pipeline.data.volume3d import prepare_volume3d
from pipeline.datasets.base import DatasetSpec
from pipeline.device import amp_autocast
from pipeline.models.classifier import build_classifier
from pipeline.models.segmenter import build_segmenter
from pipeline.models.segmenter3d import build_segmenter3d

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 32  # encoders downsample 5 times: scaled inputs are rounded to this
View = tuple[tuple[int, ...], float]  # (flipped tensor dims, scale)


def is_3d(cfg: MemberConfig) -> TypeGuard[SegConfig]:
    """Whether a config describes a 3D member (``model.spatial_dims: 3``)."""
    return isinstance(cfg, SegConfig) and cfg.model.spatial_dims == 3


def channels_last(cfg: MemberConfig) -> bool:
    """Whether a member runs in the NHWC layout (``train.channels_last``; faster on CUDA and oneDNN CPUs)."""
    return cfg.train.channels_last and not is_3d(cfg)


def input_channels(data: DataCfg, slice_channels: int) -> int:
    """Network input channels: ``2k+1`` neighbouring slices x the dataset's channels per slice."""
    return (2 * data.k + 1) * slice_channels


def build_model(cfg: MemberConfig, spec: DatasetSpec, *, pretrained: bool = True) -> nn.Module:
    """The network a seg or cls config describes, one output per class of its dataset ``spec``.

    ``pretrained``: start from the config's starting weights (``encoder_weights`` from the local
    cache, or ``pretrained_path``); False for a network whose checkpoint is loaded next (inference),
    which then needs no weights cache.
    """
    n_classes, in_channels = len(spec.classes), input_channels(cfg.data, spec.channels)
    if is_3d(cfg):
        return build_segmenter3d(
            cfg.model, in_channels, n_classes, cfg.seg3d.patch_size, pretrained=pretrained
        )
    if isinstance(cfg, SegConfig):
        return build_segmenter(cfg.model, in_channels=in_channels, classes=n_classes, pretrained=pretrained)
    return build_classifier(cfg.model, in_channels=in_channels, classes=n_classes, pretrained=pretrained)


def tta_views(tta: TTACfg | None) -> list[View]:
    """Every (flip combination, scale) view; the identity first. None: the identity only."""
    if tta is None:
        return [((), 1.0)]
    axes = [d for d, on in ((-1, tta.hflip), (-2, tta.vflip)) if on]
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(sorted(axes), r)]
    scales = list(dict.fromkeys(float(s) for s in tta.scales)) or [1.0]  # > 0: checked at config load
    return [(flip, scale) for scale in scales for flip in flips]


def scaled_size(size: tuple[int, ...], scale: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    height, width = (max(multiple, round(s * scale / multiple) * multiple) for s in size)
    return height, width


def forward_views(model: nn.Module, x: torch.Tensor, views: list[View], amp: bool = True) -> torch.Tensor:
    """Mean sigmoid probabilities over ``views`` of a batch, each inverted to ``x``'s grid.

    Segmentation outputs (B, C, H, W) are flipped / resized back; classifier outputs (B, C)
    need no inversion.
    """
    size = tuple(x.shape[-2:])
    total: torch.Tensor | None = None
    for flips, scale in views:
        view = x
        if scale != 1.0:
            view = F.interpolate(view, size=scaled_size(size, scale), mode="bilinear", align_corners=False)
        if flips:
            view = torch.flip(view, flips)
        with amp_autocast(x.device, amp):
            out = model(view)
        prob = out.float().sigmoid()
        if prob.ndim == 4:
            if flips:
                prob = torch.flip(prob, flips)
            if tuple(prob.shape[-2:]) != size:
                prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
        total = prob if total is None else total + prob
    if total is None:
        raise ValueError("forward_views needs at least one view")
    return total / len(views)


def _batches(
    model: nn.Module,
    x: np.ndarray,
    device: torch.device,
    batch_size: int,
    views: list[View],
    amp: bool,
    nhwc: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            batch = batch.to(device, non_blocking=True)
            if nhwc:
                batch = batch.contiguous(memory_format=torch.channels_last)
            yield start, forward_views(model, batch, views, amp).cpu().numpy()


def predict_volume(
    model: nn.Module,
    cfg: MemberConfig,
    image: np.ndarray,
    box: Box,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    tta: TTACfg | None = None,
    amp: bool = True,
) -> np.ndarray:
    """float32 probabilities of a member on a volume (S, [C,] H, W).

    A segmenter gives (S, classes, H, W) in the volume's own geometry (a 3D member by sliding
    window, :func:`predict_sliding_window`); the slice classifier gives (S, classes) presence
    probabilities, its TTA the flip views only (scales are a segmentation option).
    """
    device = torch.device(device)
    if is_3d(cfg):
        return predict_sliding_window(model, cfg.data, cfg.seg3d, image, box, device=device, tta=tta, amp=amp)
    classifier = isinstance(cfg, ClsConfig)
    if classifier and tta is not None:
        tta = TTACfg(hflip=tta.hflip, vflip=tta.vflip, scales=(1.0,))
    x, geometry = prepare_volume(image, box, cfg.data)
    probs: np.ndarray | None = None
    for start, p in _batches(model, x, device, batch_size, tta_views(tta), amp, channels_last(cfg)):
        if probs is None:  # (S, classes[, Hn, Wn]): the class count is the network's
            probs = np.empty((len(x), *p.shape[1:]), dtype=np.float32)
        probs[start : start + len(p)] = p
    if probs is None:
        raise ValueError(f"predict_volume got an empty volume of shape {image.shape}")
    return probs if classifier else geometry.inverse(probs)


def volume_views(tta: TTACfg | None) -> list[tuple[int, ...]]:
    """The flips of a 3D member's TTA, on the in-plane axes of a (B, C, D, H, W) tensor; identity first.

    Scales are a 2D option: a 3D member ignores them.
    """
    return [flips for flips, scale in tta_views(tta) if scale == 1.0]


def predict_sliding_window(
    model: nn.Module,
    data: DataCfg,
    seg3d: Seg3DCfg,
    image: np.ndarray,
    box: Box,
    *,
    device: torch.device | str = "cpu",
    tta: TTACfg | None = None,
    amp: bool = True,
) -> np.ndarray:
    """float32 (S, classes, H, W) probabilities of a 3D member on a volume (S, [C,] H, W).

    The prepared volume (C, S, Hn, Wn) goes through MONAI's sliding-window inference
    (``seg3d.roi_size``, ``overlap``, Gaussian or constant blending of overlapping windows) once per
    flip view; each view's sigmoid probabilities are flipped back before the mean, which is pasted
    back to the volume's own geometry like a 2.5D member's.
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    x, geometry = prepare_volume3d(image, box, data)  # (C, S, Hn, Wn) with k = 0
    volume = torch.from_numpy(x)[None].to(device)
    views = volume_views(tta)
    total: torch.Tensor | None = None
    model.eval()
    with torch.inference_mode(), amp_autocast(device, amp):
        for flips in views:
            view = torch.flip(volume, flips) if flips else volume
            logits = sliding_window_inference(
                view, seg3d.roi_size, seg3d.sw_batch_size, model, overlap=seg3d.overlap, mode=seg3d.blend
            )
            prob = torch.as_tensor(logits).as_subclass(torch.Tensor).float().sigmoid()
            prob = torch.flip(prob, flips) if flips else prob
            total = prob if total is None else total + prob
    assert total is not None  # volume_views always holds the identity view
    probs = (total / len(views))[0].cpu().numpy()  # (classes, S, Hn, Wn)
    return geometry.inverse(np.ascontiguousarray(np.moveaxis(probs, 0, 1)))
