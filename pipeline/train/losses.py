"""The training loss: a weighted sum of BCE, Dice, Tversky, Lovász hinge and focal terms.

``mode="multilabel"``: segmentation logits / targets (B, C, H, W) for the 2.5D members or
(B, C, D, H, W) for a 3D member, each class an independent sigmoid. ``mode="binary"``: classifier
logits / targets (B, C). Targets are 0/1 floats, or :data:`~pipeline.data.labels.IGNORE` where a
label is missing (``data.missing_labels: ignore``): every term skips those elements, as if they
were not there, and their logits get no gradient.

Term semantics (smp 0.6 losses where they fit, checked by hand-computed tests):
- bce: mean binary cross-entropy over the valid elements, ``pos_weight`` scaling the positive term.
- dice / tversky: soft scores per class over the whole batch (probabilities p = sigmoid),
  TP = Σ p·t, FP = Σ p·(1-t), FN = Σ (1-p)·t over the valid elements, score = TP / (TP + α·FP + β·FN),
  loss = 1 - score, mean over classes; a class with no valid positive element in the batch
  contributes 0 (smp rule). Dice is Tversky with α = β = 0.5.
- lovasz: Lovász hinge per (image, class) map on its valid pixels, averaged over the maps (a map
  without a valid pixel contributes 0; segmentation only).
- focal: (1 - p_t)^γ · BCE, mean over classes of the per-class mean over valid elements (a class
  without a valid element contributes 0). Written here: smp's multilabel focal loss cannot index its
  ignore mask (0.6).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, LossCfg
from pipeline.data.labels import IGNORE

MODES = ("multilabel", "binary")


def valid_mask(target: torch.Tensor) -> torch.Tensor:
    """True where the target is a label (0/1), False where it is :data:`IGNORE`."""
    return target != IGNORE


class BCELoss(nn.Module):
    """Binary cross-entropy averaged over the valid elements (0 when there is none)."""

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pw = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
        valid = valid_mask(target)
        target = torch.where(valid, target, torch.zeros_like(target))  # finite terms, masked below
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
        return (loss * valid).sum() / valid.sum().clamp_min(1)


class FocalLoss(nn.Module):
    """``(1 - p_t)^γ · BCE``: per class the mean over its valid elements, then the mean over classes."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = valid_mask(target)
        # ignored elements computed at (logit 0, target 0): finite, so 0 * their gradient stays 0 for any γ
        logits = torch.where(valid, logits, torch.zeros_like(logits))
        target = torch.where(valid, target, torch.zeros_like(target))
        logpt = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = (1.0 - torch.exp(-logpt)).pow(self.gamma) * logpt * valid
        dims = [d for d in range(loss.ndim) if d != 1]
        per_class = loss.sum(dims) / valid.sum(dims).clamp_min(1)
        return per_class.mean()


class LovaszPerMap(nn.Module):
    """smp's Lovász hinge on the valid pixels of every (image, class) map, averaged over the maps."""

    def __init__(self) -> None:
        super().__init__()
        from segmentation_models_pytorch.losses import LovaszLoss

        self.loss = LovaszLoss(mode="binary", per_image=True, ignore_index=IGNORE)

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

    Called as ``loss(logits, target)`` with (B, C, H, W) or (B, C, D, H, W) tensors for
    ``multilabel`` and (B, C) for ``binary``; targets may hold :data:`IGNORE`; returns a scalar
    fp32 tensor.
    """
    from segmentation_models_pytorch.losses import DiceLoss, TverskyLoss

    if mode not in MODES:
        raise ConfigError(f"loss mode must be one of {MODES}, got {mode!r}")
    c = loss_cfg  # ranges, the all-zero case and lovasz on a classifier are refused at config load
    # smp's "multilabel" mode treats (B, C) as (B, C, 1): per-class terms in both of our modes; its
    # ignore_index zeroes p and t at ignored elements before the sums (checked by the tests)
    candidates: list[tuple[str, float, Callable[[], nn.Module]]] = [
        ("bce", c.bce, lambda: BCELoss(c.pos_weight)),
        ("dice", c.dice, lambda: DiceLoss(mode="multilabel", from_logits=True, ignore_index=IGNORE)),
        (
            "tversky",
            c.tversky,
            lambda: TverskyLoss(
                mode="multilabel", alpha=c.tversky_alpha, beta=c.tversky_beta, ignore_index=IGNORE
            ),
        ),
        ("lovasz", c.lovasz, LovaszPerMap),
        ("focal", c.focal, lambda: FocalLoss(c.focal_gamma)),
    ]
    return WeightedSum([(name, float(weight), make()) for name, weight, make in candidates if weight > 0])
