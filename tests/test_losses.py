"""Each loss term against values computed by hand on a 1x2x2x2 case, and their combination."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, LossCfg, load_config
from pipeline.train.losses import build_loss

LN3 = math.log(3.0)
OFF = dict(bce=0.0, dice=0.0, tversky=0.0, lovasz=0.0, focal=0.0)


def case() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: logits [[0, ln3], [-ln3, 0]] -> p = [[.5, .75], [.25, .5]], target [[1, 0], [0, 0]].
    Class 1: logits all -2, target empty (absent from the batch)."""
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]], [[-2.0, -2.0], [-2.0, -2.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    return logits, target


def only(term: str, **extra: float) -> LossCfg:
    return LossCfg(**{**OFF, term: 1.0, **extra})


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_by_hand() -> None:
    logits, target = case()
    # class 0: -ln p for the positive, -ln(1 - p) for the negatives; class 1: -ln(1 - sigmoid(-2)) each
    class0 = -(math.log(0.5) + math.log(0.25) + math.log(0.75) + math.log(0.5))
    class1 = 4 * softplus(-2.0)
    got = build_loss(only("bce"), "multilabel")(logits, target)
    assert got.item() == pytest.approx((class0 + class1) / 8, rel=1e-6)


def test_bce_pos_weight_scales_positive_terms_only() -> None:
    logits, target = case()
    plain = build_loss(only("bce"), "multilabel")(logits, target).item()
    weighted = build_loss(only("bce", pos_weight=3.0), "multilabel")(logits, target).item()
    # one positive pixel with loss -ln .5; pos_weight 3 adds 2 more of it
    assert weighted == pytest.approx(plain + 2 * -math.log(0.5) / 8, rel=1e-6)


def test_dice_by_hand_and_absent_class_counts_zero() -> None:
    logits, target = case()
    # class 0: TP = .5, FP = .75 + .25 + .5 = 1.5, FN = .5 -> dice = .5 / (.5 + .75 + .25) = 1/3
    # class 1 has no positive in the batch: contributes 0 (smp rule), mean over 2 classes
    got = build_loss(only("dice"), "multilabel")(logits, target)
    assert got.item() == pytest.approx((1 - 1 / 3) / 2, rel=1e-5)


def test_tversky_by_hand() -> None:
    logits, target = case()
    cfg = only("tversky", tversky_alpha=0.3, tversky_beta=0.7)
    # TP / (TP + .3 FP + .7 FN) = .5 / (.5 + .45 + .35)
    got = build_loss(cfg, "multilabel")(logits, target)
    assert got.item() == pytest.approx((1 - 0.5 / 1.3) / 2, rel=1e-5)


def test_tversky_half_half_is_dice() -> None:
    logits, target = torch.randn(2, 3, 5, 5), (torch.rand(2, 3, 5, 5) > 0.5).float()
    dice = build_loss(only("dice"), "multilabel")(logits, target)
    tversky = build_loss(only("tversky"), "multilabel")(logits, target)
    assert torch.allclose(dice, tversky, atol=1e-6)


def test_lovasz_by_hand_per_image_and_class() -> None:
    logits, target = case()
    # class 0 errors 1 - z*(2t-1): [1, 1 + ln3, 1 - ln3, 1]; sorted with their Jaccard gradient
    # (0.5, 0.5, 0, 0) -> (1 + ln3) / 2 + 1 / 2.  Class 1 errors are all -1 -> hinge 0.
    got = build_loss(only("lovasz"), "multilabel")(logits, target)
    assert got.item() == pytest.approx((1 + LN3 / 2) / 2, rel=1e-5)


def test_focal_by_hand() -> None:
    logits, target = case()
    pt0 = [0.5, 0.25, 0.75, 0.5]  # probability given to the true label, class 0
    class0 = sum((1 - p) ** 2 * -math.log(p) for p in pt0) / 4
    pt1 = 1 / (1 + math.exp(-2.0))
    class1 = (1 - pt1) ** 2 * -math.log(pt1)
    got = build_loss(only("focal", focal_gamma=2.0), "multilabel")(logits, target)
    assert got.item() == pytest.approx((class0 + class1) / 2, rel=1e-5)


def test_focal_gamma_zero_is_bce() -> None:
    logits, target = case()
    focal = build_loss(only("focal", focal_gamma=0.0), "multilabel")(logits, target)
    bce = build_loss(only("bce"), "multilabel")(logits, target)
    assert focal.item() == pytest.approx(bce.item(), rel=1e-6)  # same counts per class here


def test_perfect_prediction_has_zero_dice_and_lovasz() -> None:
    target = (torch.rand(2, 3, 8, 8) > 0.5).float()
    target[:, :, 0, 0] = 1.0  # every class present
    logits = 30.0 * (2 * target - 1)
    assert build_loss(only("dice"), "multilabel")(logits, target).item() < 1e-5
    assert build_loss(only("lovasz"), "multilabel")(logits, target).item() == 0.0
    assert build_loss(only("dice"), "multilabel")(-logits, target).item() > 0.99


def test_weights_combine_linearly() -> None:
    logits, target = torch.randn(2, 3, 6, 6), (torch.rand(2, 3, 6, 6) > 0.5).float()
    terms = {t: build_loss(only(t), "multilabel")(logits, target) for t in OFF}
    weights = dict(bce=0.5, dice=2.0, tversky=0.25, lovasz=1.5, focal=3.0)
    got = build_loss(LossCfg(**weights), "multilabel")(logits, target)
    assert got.item() == pytest.approx(sum(w * terms[t].item() for t, w in weights.items()), rel=1e-5)


def test_binary_mode_for_classifier_logits() -> None:
    logits = torch.tensor([[0.0, LN3, -LN3]])
    target = torch.tensor([[1.0, 1.0, 0.0]])
    got = build_loss(LossCfg(bce=1.0, dice=0.0), "binary")(logits, target)
    assert got.item() == pytest.approx(-(math.log(0.5) + 2 * math.log(0.75)) / 3, rel=1e-6)
    both = build_loss(LossCfg(bce=1.0, dice=1.0, focal=1.0), "binary")(logits, target)
    assert both.shape == () and math.isfinite(both.item())


def test_every_term_has_gradients_and_loss_is_fp32() -> None:
    logits = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    target = (torch.rand(2, 3, 6, 6) > 0.5).float()
    loss = build_loss(LossCfg(bce=1, dice=1, tversky=1, lovasz=1, focal=1), "multilabel")(logits, target)
    loss.backward()
    assert loss.dtype == torch.float32
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
    assert logits.grad.float().abs().sum() > 0


@pytest.mark.parametrize(
    ("config", "overrides", "needle"),
    [
        ("demo_seg", ["loss.bce=0", "loss.dice=0"], "every loss weight"),
        ("demo_seg", ["loss.bce=-1"], r"'loss.bce' = -1.0 must be >= 0"),
        ("demo_cls", ["loss.lovasz=1"], "'loss.lovasz' applies to segmentation only"),
        ("demo_cls", ["loss.pos_weight=0"], r"'loss.pos_weight' = 0.0 must be > 0"),
    ],
)
def test_bad_loss_configs_fail_at_load(config: str, overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(config, overrides)


def test_unknown_loss_mode_fails() -> None:
    with pytest.raises(ConfigError, match="loss mode"):
        build_loss(LossCfg(), "multiclass")
