"""The training engine on a tiny conv net and random tensors (CPU): files, resume, EMA, schedule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.config import LossCfg, TrainCfg
from pipeline.device import resolve_device
from pipeline.train.engine import fit, load_weights
from pipeline.train.losses import build_loss
from pipeline.train.schedule import build_scheduler, lr_factor, plan_steps

TIMING = ("images_per_s", "train_seconds", "seconds")
BASE = TrainCfg(epochs=2, batch_size=4, lr=1e-2, warmup_epochs=0.5, device="cpu", seed=3)


class Noisy(Dataset):
    """Random tensors; every item draws fresh noise from torch's RNG (an 'augmentation')."""

    def __init__(self, n: int = 12, channels: int = 2, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, channels, size, size, generator=g)
        self.y = (torch.rand(n, 3, size, size, generator=g) > 0.6).float()
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i] + 0.1 * torch.randn_like(self.x[i]), "target": self.y[i], "index": i}


def tiny_model(seed: int = 0, batch_free: bool = False) -> nn.Module:
    """Conv, batch-norm, dropout, conv; ``batch_free`` drops the layers whose output depends on the batch."""
    torch.manual_seed(seed)
    if batch_free:
        return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    layers = [nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Conv2d(8, 3, 1))


def loader(dataset: Dataset | None = None, batch_size: int = 4, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset or Noisy(), batch_size=batch_size, shuffle=shuffle)


def loss_fn() -> nn.Module:
    return build_loss(LossCfg(bce=1.0, dice=1.0), "multilabel")


def scorer(scores: dict[int, float] | None = None):
    def validate(model: nn.Module, epoch: int) -> dict[str, float]:
        assert not model.training
        with torch.no_grad():
            mean = float(model(Noisy().x).mean())
        return {"score": scores[epoch] if scores else -abs(mean), "mean": mean}

    return validate


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_writes_best_last_metrics_and_config(tmp_path: Path) -> None:
    model = tiny_model()
    result = fit(
        model, loader(), loss_fn(), BASE, tmp_path, validate=scorer({1: 0.7, 2: 0.4}), config_text="x: 1\n"
    )
    assert (result.best_score, result.best_epoch, result.epochs_run) == (0.7, 1, 2)
    assert (tmp_path / "config.yaml").read_text() == "x: 1\n"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert {"train_loss", "lr", "images_per_s", "seconds", "score", "mean"} <= set(metrics.columns)
    assert list(metrics["score"]) == [0.7, 0.4]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (best["epoch"], best["score"]) == (1, 0.7)
    assert last["epoch"] == 2 and last["step"] == 6 and last["best_epoch"] == 1
    assert not states_equal(best["model"], last["model"])  # epoch 2 changed the weights
    assert states_equal(last["model"], {k: v.cpu() for k, v in model.state_dict().items()})
    fresh = tiny_model(seed=9)
    assert load_weights(tmp_path / "best.pt", fresh)["epoch"] == 1
    assert states_equal(fresh.state_dict(), best["model"])


def test_without_validation_best_is_the_last_epoch(tmp_path: Path) -> None:
    result = fit(tiny_model(), loader(), loss_fn(), BASE, tmp_path)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (result.best_score, result.best_epoch, best["epoch"], best["score"]) == (None, 2, 2, None)
    assert states_equal(best["model"], last["model"])


@pytest.mark.parametrize(
    "cfg",
    [BASE, dataclasses.replace(BASE, ema=True, ema_decay=0.5, accum_steps=2, clip_grad=0.05)],
    ids=["plain", "ema-accum-clip"],
)
def test_resume_matches_an_uninterrupted_run(tmp_path: Path, cfg: TrainCfg) -> None:
    whole = fit(tiny_model(), loader(), loss_fn(), cfg, tmp_path / "whole", validate=scorer())

    def crash_in_epoch_2(model: nn.Module, epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt
        return scorer()(model, epoch)

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), loader(), loss_fn(), cfg, tmp_path / "cut", validate=crash_in_epoch_2)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = fit(tiny_model(seed=5), loader(), loss_fn(), cfg, tmp_path / "cut", validate=scorer())
    assert resumed.epochs_run == 1
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert states_equal(a["model"], b["model"])
    if cfg.ema:
        assert states_equal(a["ema"], b["ema"])
    assert a["step"] == b["step"] and a["best_epoch"] == b["best_epoch"]
    drop = lambda h: [{k: v for k, v in row.items() if k not in TIMING} for row in h]  # noqa: E731
    assert drop(whole.history) == drop(resumed.history)
    assert pd.read_csv(tmp_path / "cut" / "metrics.csv")["epoch"].tolist() == [1, 2]


class Recorder(DataLoader):
    """A DataLoader that remembers the sample indices of every batch it yields."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.order: list[list[int]] = []

    def __iter__(self):
        for batch in super().__iter__():
            self.order.append(batch["index"].tolist())
            yield batch


def test_resume_with_another_step_plan_goes_on_from_the_next_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """last.pt of batches of 4 (3 steps an epoch, as 2 processes would take) resumed on batches of 2 (6)."""
    cfg = BASE

    def crash_in_epoch_2(model: nn.Module, epoch: int) -> dict[str, float]:
        if epoch == 2:
            raise KeyboardInterrupt
        return {"score": 0.0}

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), loader(batch_size=4), loss_fn(), cfg, tmp_path / "cut", validate=crash_in_epoch_2)
    resumed = fit(tiny_model(), loader(batch_size=2), loss_fn(), cfg, tmp_path / "cut")
    assert "the schedule goes on from the start of epoch 2" in caplog.text
    straight = fit(tiny_model(), loader(batch_size=2), loss_fn(), cfg, tmp_path / "straight")
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (last["step"], last["steps_per_epoch"], last["world_size"]) == (12, 6, 1)
    lrs = [row["lr"] for row in resumed.history]
    assert lrs[1] == pytest.approx(straight.history[1]["lr"])
    assert lrs[0] == pytest.approx(BASE.lr * lr_factor(2, 2, 6, BASE.min_lr_ratio))  # epoch 1: the old plan


def test_data_order_depends_on_seed_and_epoch_only(tmp_path: Path) -> None:
    orders = []
    for name, caller_seed in (("a", 123), ("b", 456)):
        data = Noisy()
        rec = Recorder(data, batch_size=4, shuffle=True)
        torch.manual_seed(caller_seed)  # whatever the caller's RNG state, the same order
        fit(tiny_model(), rec, loss_fn(), BASE, tmp_path / name)
        assert data.epochs == [1, 2]  # set_epoch reached the dataset
        orders.append(rec.order)
    assert orders[0] == orders[1]
    assert orders[0][:3] != orders[0][3:]  # a new order every epoch
    other = Recorder(Noisy(), batch_size=4, shuffle=True)
    fit(tiny_model(), other, loss_fn(), dataclasses.replace(BASE, seed=4), tmp_path / "c")
    assert other.order != orders[0]


def test_finished_run_returns_without_training(tmp_path: Path) -> None:
    fit(tiny_model(), loader(), loss_fn(), BASE, tmp_path, validate=scorer())
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    again = fit(tiny_model(), loader(), loss_fn(), BASE, tmp_path, validate=scorer())
    assert again.epochs_run == 0 and len(again.history) == 2
    assert (tmp_path / "last.pt").stat().st_mtime_ns == stamp
    over = fit(tiny_model(), loader(), loss_fn(), BASE, tmp_path, validate=scorer(), resume=False)
    assert over.epochs_run == 2


def test_ema_weights_are_validated_and_saved(tmp_path: Path) -> None:
    model = tiny_model()
    seen = []

    def validate(m: nn.Module, epoch: int) -> dict[str, float]:
        seen.append(m is not model and not m.training)
        return {"score": float(epoch)}

    cfg = dataclasses.replace(BASE, ema=True, ema_decay=0.9)
    fit(model, loader(), loss_fn(), cfg, tmp_path, validate=validate)
    assert seen == [True, True]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and states_equal(best["model"], last["ema"])
    assert not states_equal(last["ema"], last["model"])


def test_accumulation_equals_a_big_batch(tmp_path: Path) -> None:
    """Two half batches accumulated give the gradient of the whole batch (mean loss, no batch-norm or dropout)."""
    cfg = dataclasses.replace(BASE, epochs=1, clip_grad=None)
    bce = build_loss(LossCfg(bce=1.0, dice=0.0), "multilabel")
    big, small = tiny_model(batch_free=True), tiny_model(batch_free=True)
    fit(big, loader(batch_size=4, shuffle=False), bce, cfg, tmp_path / "big")
    fit(
        small,
        loader(batch_size=2, shuffle=False),
        bce,
        dataclasses.replace(cfg, accum_steps=2),
        tmp_path / "small",
    )
    for p, q in zip(big.parameters(), small.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    assert torch.load(tmp_path / "small" / "last.pt", weights_only=True)["step"] == 3


def test_partial_accumulation_group_still_steps(tmp_path: Path) -> None:
    cfg = dataclasses.replace(BASE, epochs=1, accum_steps=2, max_steps_per_epoch=5)
    fit(tiny_model(), loader(Noisy(n=24)), loss_fn(), cfg, tmp_path)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3  # 5 batches -> 2 + 2 + 1


def test_schedule_values_at_known_steps() -> None:
    # 2 warm-up steps then cosine over 11 steps down to 0.01 at the last (step 10)
    assert lr_factor(0, 2, 11, 0.01) == pytest.approx(0.5)
    assert lr_factor(1, 2, 11, 0.01) == pytest.approx(1.0)
    assert lr_factor(2, 2, 11, 0.01) == pytest.approx(1.0)
    assert lr_factor(6, 2, 11, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)  # half way: cos = 0
    assert lr_factor(10, 2, 11, 0.01) == pytest.approx(0.01)
    assert lr_factor(0, 0, 4, 0.0) == pytest.approx(1.0)


def test_plan_and_scheduler_follow_the_config() -> None:
    cfg = dataclasses.replace(BASE, epochs=3, accum_steps=2, warmup_epochs=1.5, max_steps_per_epoch=7)
    plan = plan_steps(cfg, loader_len=10)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (
        7,
        4,
        12,
        6,
    )
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, plan, cfg.min_lr_ratio)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 * lr_factor(s, 6, 12, cfg.min_lr_ratio) for s in range(12)]
    assert lrs == pytest.approx(expected)
    assert lrs[5] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1 * cfg.min_lr_ratio)


def test_recorded_lr_follows_the_schedule(tmp_path: Path) -> None:
    result = fit(tiny_model(), loader(), loss_fn(), BASE, tmp_path)
    plan = plan_steps(BASE, 3)
    last_steps = [plan.steps_per_epoch * e - 1 for e in (1, 2)]
    expected = [
        BASE.lr * lr_factor(s, plan.warmup_steps, plan.total_steps, BASE.min_lr_ratio) for s in last_steps
    ]
    assert [row["lr"] for row in result.history] == pytest.approx(expected)


def test_val_every_validates_on_schedule_and_at_the_end(tmp_path: Path) -> None:
    epochs = []
    cfg = dataclasses.replace(BASE, epochs=3, val_every=2)
    fit(
        tiny_model(),
        loader(),
        loss_fn(),
        cfg,
        tmp_path,
        validate=lambda m, e: epochs.append(e) or {"score": e},
    )
    assert epochs == [2, 3]
    assert math.isnan(pd.read_csv(tmp_path / "metrics.csv")["score"][0])


def test_failures_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="monitored metric is 'dice'"):
        fit(tiny_model(), loader(), loss_fn(), BASE, tmp_path / "a", validate=scorer(), monitor="dice")
    nan_loss = lambda logits, target: logits.sum() * math.nan  # noqa: E731
    with pytest.raises(RuntimeError, match="training loss is nan"):
        fit(tiny_model(), loader(), nan_loss, BASE, tmp_path / "b")

    class Oom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    model = nn.Sequential(nn.Conv2d(2, 3, 1), Oom())
    with pytest.raises(RuntimeError, match=r"train.batch_size=4 with images of shape \(4, 2, 8, 8\)"):
        fit(model, loader(), loss_fn(), BASE, tmp_path / "c")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16-scaler"])
def test_cuda_amp_channels_last_ema_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bf16: bool
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg = dataclasses.replace(BASE, device="cuda", ema=True, channels_last=True, amp=True, accum_steps=2)

    def crash_in_epoch_2(model: nn.Module, epoch: int) -> dict[str, float]:
        assert next(model.parameters()).is_cuda
        if epoch == 2:
            raise KeyboardInterrupt
        return {"score": 1.0}

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), loader(), loss_fn(), cfg, tmp_path, validate=crash_in_epoch_2)
    result = fit(tiny_model(), loader(), loss_fn(), cfg, tmp_path, validate=lambda m, e: {"score": float(e)})
    assert result.epochs_run == 1 and result.best_epoch == 2
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in last["model"].values())
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert bool(last["scaler"]) == (not bf16)  # the GradScaler runs only for fp16
