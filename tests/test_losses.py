"""Each loss term against values computed by hand on a 1x2x2x2 case, their combination, and the
missing-label mask (IGNORE) against brute-force twins on the valid elements."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, LossCfg, load_config
from pipeline.data.labels import IGNORE
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


# --------------------------------------------------------------------------- missing labels (IGNORE)
# Twins computed from the definitions on the valid elements alone (the ignored ones removed), with
# autograd through plain torch ops, so loss and gradient are both compared.


def twin_bce(z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, pos_weight: float | None) -> torch.Tensor:
    zv, tv = z[valid], t[valid]
    p = torch.sigmoid(zv)
    w = 1.0 if pos_weight is None else pos_weight
    return -(w * tv * torch.log(p) + (1 - tv) * torch.log(1 - p)).mean()


def per_class(
    z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, targets) of each class's valid elements, over the whole batch."""
    return [(z[:, c][valid[:, c]], t[:, c][valid[:, c]]) for c in range(z.shape[1])]


def twin_tversky(z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, a: float, b: float) -> torch.Tensor:
    losses = []
    for zc, tc in per_class(z, t, valid):
        if tc.sum() == 0:  # no valid positive: 0 (smp rule), still counted in the mean
            losses.append(zc.sum() * 0.0)
            continue
        p = torch.sigmoid(zc)
        tp, fp, fn = (p * tc).sum(), (p * (1 - tc)).sum(), ((1 - p) * tc).sum()
        losses.append(1 - tp / (tp + a * fp + b * fn))
    return torch.stack(losses).mean()


def twin_focal(z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    losses = []
    for zc, tc in per_class(z, t, valid):
        p = torch.sigmoid(zc)
        pt = torch.where(tc > 0, p, 1 - p)
        losses.append(((1 - pt) ** gamma * -torch.log(pt)).mean() if len(tc) else zc.sum() * 0.0)
    return torch.stack(losses).mean()


def lovasz_hinge(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Lovász hinge of one flat map (Berman et al., Alg. 1), 0 for a map without pixels."""
    if len(t) == 0:
        return z.sum() * 0.0
    errors = 1 - z * (2 * t - 1)
    order = torch.argsort(errors, descending=True)
    errors, gt = errors[order], t[order]
    jaccard = 1 - (gt.sum() - gt.cumsum(0)) / (gt.sum() + (1 - gt).cumsum(0))
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return (torch.relu(errors) * grad).sum()


def twin_lovasz(z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    maps = [
        (z[b, c][valid[b, c]], t[b, c][valid[b, c]]) for b in range(z.shape[0]) for c in range(z.shape[1])
    ]
    return torch.stack([lovasz_hinge(zm, tm) for zm, tm in maps]).mean()


TWINS = {
    "bce": lambda z, t, v: twin_bce(z, t, v, None),
    "dice": lambda z, t, v: twin_tversky(z, t, v, 0.5, 0.5),
    "tversky": lambda z, t, v: twin_tversky(z, t, v, 0.3, 0.7),
    "lovasz": twin_lovasz,
    "focal": lambda z, t, v: twin_focal(z, t, v, 2.0),
}
TERM_CFG = {"tversky": dict(tversky_alpha=0.3, tversky_beta=0.7), "focal": dict(focal_gamma=2.0)}


def ignored_case(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits and 0/1 targets with IGNORE at scattered elements, on a whole map (image 0,
    class 0) and on every element of the last class (a class without any valid element)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(shape, generator=g)
    target = (torch.rand(shape, generator=g) > 0.6).float()
    ignore = torch.rand(shape, generator=g) < 0.3
    ignore[0, 0] = True
    ignore[:, -1] = True
    return logits, target.masked_fill(ignore, IGNORE), ~ignore


SHAPES = [("multilabel", (3, 3, 5, 6)), ("multilabel", (2, 3, 3, 4, 5)), ("binary", (16, 3))]


@pytest.mark.parametrize("term", list(TWINS))
@pytest.mark.parametrize(("mode", "shape"), SHAPES, ids=["2d", "3d", "cls"])
def test_ignored_elements_have_no_loss_and_no_gradient(term: str, mode: str, shape: tuple[int, ...]) -> None:
    if term == "lovasz" and mode == "binary":
        pytest.skip("lovasz is refused for classifiers at config load")
    logits, target, valid = ignored_case(shape)
    assert valid.any() and not valid.all()
    z = logits.clone().requires_grad_(True)
    got = build_loss(only(term, **TERM_CFG.get(term, {})), mode)(z, target)
    got.backward()
    z_twin = logits.clone().requires_grad_(True)
    want = TWINS[term](z_twin, target, valid)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    assert torch.all(z.grad[~valid] == 0)  # exactly nothing flows into a missing label
    torch.testing.assert_close(z.grad, z_twin.grad, rtol=1e-4, atol=1e-7)
    assert z.grad[valid].abs().sum() > 0
    # whatever the network says where the label is missing, the loss does not move
    wild = logits.masked_fill(~valid, 1e4)
    again = build_loss(only(term, **TERM_CFG.get(term, {})), mode)(wild, target)
    assert again.item() == pytest.approx(got.item(), rel=1e-6, abs=1e-7)


def test_bce_pos_weight_with_ignored_elements() -> None:
    logits, target, valid = ignored_case((2, 3, 4, 4), seed=1)
    got = build_loss(only("bce", pos_weight=3.0), "multilabel")(logits, target)
    assert got.item() == pytest.approx(twin_bce(logits, target, valid, 3.0).item(), rel=1e-5)


def test_ignore_by_hand() -> None:
    """The hand case with class 0's two last pixels missing: each term on the two pixels left."""
    logits, target = case()
    target[0, 0, 1, :] = IGNORE  # left: p = [.5, .75], t = [1, 0]
    bce = build_loss(only("bce"), "multilabel")(logits, target)
    assert bce.item() == pytest.approx((-math.log(0.5) - math.log(0.25) + 4 * softplus(-2.0)) / 6, rel=1e-6)
    dice = build_loss(only("dice"), "multilabel")(logits, target)  # TP .5, FP .75, FN .5
    assert dice.item() == pytest.approx((1 - 0.5 / (0.5 + 0.375 + 0.25)) / 2, rel=1e-5)
    focal = build_loss(only("focal", focal_gamma=2.0), "multilabel")(logits, target)
    pt1 = 1 / (1 + math.exp(-2.0))
    class0 = (0.5**2 * -math.log(0.5) + 0.75**2 * -math.log(0.25)) / 2
    assert focal.item() == pytest.approx((class0 + (1 - pt1) ** 2 * -math.log(pt1)) / 2, rel=1e-5)


def test_every_label_missing_gives_zero_loss_and_zero_gradient() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 3, 4, 4), IGNORE)
    loss = build_loss(LossCfg(bce=1, dice=1, tversky=1, lovasz=1, focal=1), "multilabel")(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_focal_gradient_stays_finite_at_ignored_saturated_logits() -> None:
    """γ < 1 has an infinite slope where p_t = 1: an ignored, saturated logit must not turn it into NaN."""
    logits = torch.tensor([[[[-200.0, 0.0]]]], requires_grad=True)
    target = torch.tensor([[[[IGNORE, 1.0]]]])
    build_loss(only("focal", focal_gamma=0.5), "multilabel")(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 0, 0] == 0
