"""A trained member on one day-volume: prepared input, batched forward, TTA, paste-back.

Used by the per-epoch validation of training, by the out-of-fold writer and by submit, so
that a member is always evaluated the way it will be applied. Each TTA view (a flip
combination and a scale) is inverted (flipped back, resized back to the network size) before
the sigmoid probabilities are averaged; the mean goes back to the original slice geometry
with :meth:`Geometry.inverse`.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TTACfg, config_from_text
from pipeline.data.geometry import Box
from pipeline.data.prepare import prepare_day

log = logging.getLogger(__name__)

SIZE_MULTIPLE = 32  # encoders downsample 5 times: scaled inputs are rounded to this
View = tuple[tuple[int, ...], float]  # (flipped tensor dims, scale)


class MemberError(FileNotFoundError):
    """A run folder does not hold a trained member."""


def load_member(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """(model in eval mode on ``device`` with best.pt weights, its resolved config) of a run folder."""
    from pipeline.train.checkpoint import load_weights

    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / "config.yaml", run_dir / "best.pt"
    if not (config_path.is_file() and weights_path.is_file()):
        stage = run_dir.parent.parent.name if run_dir.name.startswith("fold_") else run_dir.parent.name
        target = {"seg": "train-seg CONFIG", "cls": "train-cls CONFIG_CLS"}.get(
            stage, f"train-{stage} CONFIG"
        )
        missing = " and ".join(p.name for p in (config_path, weights_path) if not p.is_file())
        raise MemberError(
            f"{run_dir}: no trained member here ({missing} missing); run "
            f"`make {target}=configs/{run_dir.parent.name}.yaml FOLDS={run_dir.name.removeprefix('fold_')}` first"
        )
    cfg = config_from_text(config_path.read_text(), source=str(config_path))
    model = build_model(cfg)
    load_weights(weights_path, model, map_location="cpu")
    device = torch.device(device)
    model = model.to(device).eval()
    if channels_last(cfg):
        model = model.to(memory_format=torch.channels_last)
    return model, cfg


def channels_last(cfg: Any) -> bool:
    """Whether a member runs in the NHWC layout (``train.channels_last``; faster on CUDA and oneDNN CPUs)."""
    return bool(getattr(getattr(cfg, "train", None), "channels_last", False))


def build_model(cfg: Any) -> nn.Module:
    """The (untrained) network a seg or cls config describes."""
    in_channels = 2 * cfg.data.k + 1
    if cfg.stage == "seg":
        from pipeline.models.segmenter import build_segmenter

        return build_segmenter(cfg.model, in_channels=in_channels)
    if cfg.stage == "cls":
        from pipeline.models.classifier import build_classifier

        return build_classifier(cfg.model, in_channels=in_channels)
    raise ValueError(f"config '{cfg.name}' is a '{cfg.stage}' config, not a seg or cls member")


def tta_views(tta: TTACfg | None) -> list[View]:
    """Every (flip combination, scale) view; the identity first. None: the identity only."""
    if tta is None:
        return [((), 1.0)]
    axes = [d for d, on in ((-1, tta.hflip), (-2, tta.vflip)) if on]
    flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(sorted(axes), r)]
    scales = list(dict.fromkeys(float(s) for s in tta.scales)) or [1.0]
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"tta.scales must be positive, got {scale}")
    return [(flip, scale) for scale in scales for flip in flips]


def scaled_size(size: tuple[int, int], scale: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    return tuple(max(multiple, round(s * scale / multiple) * multiple) for s in size)


def _autocast(device: torch.device, amp: bool) -> Any:
    from pipeline.train.engine import amp_autocast

    return amp_autocast(device, amp)


def forward_views(model: nn.Module, x: torch.Tensor, views: list[View], amp: bool = True) -> torch.Tensor:
    """Mean sigmoid probabilities over ``views`` of a batch, each inverted to ``x``'s grid.

    Segmentation outputs (B, C, H, W) are flipped / resized back; classifier outputs (B, C)
    need no inversion.
    """
    size = tuple(x.shape[-2:])
    total = None
    for flips, scale in views:
        view = x
        if scale != 1.0:
            view = F.interpolate(view, size=scaled_size(size, scale), mode="bilinear", align_corners=False)
        if flips:
            view = torch.flip(view, flips)
        with _autocast(x.device, amp):
            out = model(view)
        prob = out.float().sigmoid()
        if prob.ndim == 4:
            if flips:
                prob = torch.flip(prob, flips)
            if tuple(prob.shape[-2:]) != size:
                prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
        total = prob if total is None else total + prob
    return total / len(views)


def _batches(
    model: nn.Module,
    x: np.ndarray,
    device: torch.device,
    batch_size: int,
    views: list[View],
    amp: bool,
    nhwc: bool = False,
):
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            batch = batch.to(device, non_blocking=True)
            if nhwc:
                batch = batch.contiguous(memory_format=torch.channels_last)
            yield start, forward_views(model, batch, views, amp).cpu().numpy()


def predict_day(
    model: nn.Module,
    cfg: Any,
    image: np.ndarray,
    box: Box,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    tta: TTACfg | None = None,
    amp: bool = True,
) -> np.ndarray:
    """float32 (S, 3, H, W) probabilities of a segmenter on a day (S, H, W), in its own geometry."""
    device = torch.device(device)
    x, geometry = prepare_day(image, box, cfg.data)
    probs = np.empty((len(x), 3, *geometry.size), dtype=np.float32)
    for start, p in _batches(model, x, device, batch_size, tta_views(tta), amp, channels_last(cfg)):
        probs[start : start + len(p)] = p
    return geometry.inverse(probs)


def predict_day_cls(
    model: nn.Module,
    cfg: Any,
    image: np.ndarray,
    box: Box,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    tta: TTACfg | None = None,
    amp: bool = True,
) -> np.ndarray:
    """float32 (S, 3) organ-presence probabilities of a classifier on a day (S, H, W).

    TTA averages the flip views (scales are a segmentation option and are not used here).
    """
    device = torch.device(device)
    if tta is not None:
        tta = TTACfg(hflip=tta.hflip, vflip=tta.vflip, scales=(1.0,))
    x, _ = prepare_day(image, box, cfg.data)
    probs = np.empty((len(x), 3), dtype=np.float32)
    for start, p in _batches(model, x, device, batch_size, tta_views(tta), amp, channels_last(cfg)):
        probs[start : start + len(p)] = p
    return probs
