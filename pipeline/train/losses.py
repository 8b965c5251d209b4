"""The training loss: a weighted sum of BCE, Dice, Tversky, Lovász hinge and focal terms.

``mode="multilabel"``: segmentation logits / targets (B, C, H, W), targets 0/1 floats, each
class an independent sigmoid. ``mode="binary"``: classifier logits / targets (B, C).

Term semantics (smp 0.6 losses where they fit, checked by hand-computed tests):
- bce: mean binary cross-entropy over all elements, ``pos_weight`` scaling the positive term.
- dice / tversky: soft scores per class over the whole batch (probabilities p = sigmoid),
  TP = Σ p·t, FP = Σ p·(1-t), FN = Σ (1-p)·t, score = TP / (TP + α·FP + β·FN), loss = 1 - score,
  mean over classes; a class with no positive pixel in the batch contributes 0 (smp rule).
  Dice is Tversky with α = β = 0.5.
- lovasz: Lovász hinge per image and class, averaged (segmentation only).
- focal: (1 - p_t)^γ · BCE, mean over classes of the per-class mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, LossCfg

MODES = ("multilabel", "binary")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BCELoss(nn.Module):
    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pw = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


class LovaszPerMap(nn.Module):
    """smp's Lovász hinge, averaged over every (image, class) map rather than per image."""

    def __init__(self) -> None:
        super().__init__()
        from segmentation_models_pytorch.losses import LovaszLoss

        self.loss = LovaszLoss(mode="binary", per_image=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        maps = logits.shape[0] * logits.shape[1]
        return self.loss(logits.reshape(maps, -1), target.reshape(maps, -1))


class WeightedSum(nn.Module):
    """``Σ weight_i · term_i(logits, target)``; ``parts`` holds (name, weight, term)."""

    def __init__(self, parts: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        self.names = [name for name, _, _ in parts]
        self.weights = [weight for _, weight, _ in parts]
        self.terms = nn.ModuleList([term for _, _, term in parts])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # losses in fp32 whatever the autocast dtype
        target = target.to(logits.dtype)
        total = logits.new_zeros(())
        for weight, term in zip(self.weights, self.terms):
            total = total + weight * term(logits, target)
        return total

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights))


def build_loss(loss_cfg: LossCfg, mode: str) -> WeightedSum:
    """The weighted sum of the terms whose weight in ``loss_cfg`` is non-zero.

    Called as ``loss(logits, target)`` with (B, C, H, W) tensors for ``multilabel`` and
    (B, C) for ``binary``; returns a scalar fp32 tensor.
    """
    from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, TverskyLoss

    if mode not in MODES:
        raise ConfigError(f"loss mode must be one of {MODES}, got {mode!r}")
    c = loss_cfg  # ranges, the all-zero case and lovasz on a classifier are refused at config load
    # smp's "multilabel" mode treats (B, C) as (B, C, 1): per-class terms in both of our modes
    candidates: list[tuple[str, float, Callable[[], nn.Module]]] = [
        ("bce", c.bce, lambda: BCELoss(c.pos_weight)),
        ("dice", c.dice, lambda: DiceLoss(mode="multilabel", from_logits=True)),
        (
            "tversky",
            c.tversky,
            lambda: TverskyLoss(mode="multilabel", alpha=c.tversky_alpha, beta=c.tversky_beta),
        ),
        ("lovasz", c.lovasz, LovaszPerMap),
        ("focal", c.focal, lambda: FocalLoss(mode="multilabel", gamma=c.focal_gamma)),
    ]
    return WeightedSum([(name, float(weight), make()) for name, weight, make in candidates if weight > 0])
