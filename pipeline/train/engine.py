"""The one training loop shared by the classifier and the segmenters.

What differs between them (model, loss, data, validation metric) is passed in; this module
owns the optimizer, schedule, mixed precision, EMA, checkpoints and resume.

Reproducibility: before every epoch the engine reseeds Python / NumPy / torch from
``(cfg.seed, epoch)`` and calls ``set_epoch(epoch)`` on the loader's sampler / dataset when
they have one, so the data order and augmentations of an epoch do not depend on what ran
before it; a resumed CPU run therefore ends with the same weights as an uninterrupted one.
Epochs are numbered from 1; ``last.pt["epoch"]`` is the number of finished epochs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import TrainCfg, to_dict
from pipeline.device import amp_autocast, amp_dtype, resolve_device
from pipeline.io import write_csv, write_text
from pipeline.runtime import balance_threads, seed_everything
from pipeline.train import checkpoint
from pipeline.train.checkpoint import BEST, LAST, cpu_state, load_weights
from pipeline.train.schedule import StepPlan, build_scheduler, plan_steps

__all__ = ["FitResult", "fit", "load_weights"]

log = logging.getLogger(__name__)

Validate = Callable[[nn.Module, int], dict[str, float]]
LOG_EVERY = 20  # batches between GPU syncs for the progress bar's running loss


@dataclass
class FitResult:
    out_dir: Path
    best_score: float | None
    best_epoch: int
    epochs_run: int  # epochs trained by this call (0 when the run was already finished)
    history: list[dict[str, float]] = field(default_factory=list)


def _seed_epoch(seed: int, epoch: int) -> None:
    seed_everything(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def _set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` once on each of the loader's sampler / batch sampler / dataset that has it."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    parts = [
        loader,
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
        getattr(loader, "dataset", None),
    ]
    seen: set[int] = set()
    for part in parts:
        if part is not None and id(part) not in seen and callable(getattr(part, "set_epoch", None)):
            seen.add(id(part))
            part.set_epoch(epoch)


def _loader_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


class _Run:
    """Model, optimizer, schedule, scaler and EMA of one fit, and their checkpoint state."""

    def __init__(self, model: nn.Module, cfg: TrainCfg, plan: StepPlan, device: torch.device) -> None:
        from timm.optim import param_groups_weight_decay
        from timm.utils import ModelEmaV3

        self.cfg, self.plan, self.device = cfg, plan, device
        self.channels_last = cfg.channels_last
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = amp_dtype(device, cfg.amp)
        # no weight decay on biases and norm weights (timm's rule)
        groups = param_groups_weight_decay(self.model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, plan, cfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.epoch = 0
        self.step = 0
        self.best_score: float | None = None
        self.best_epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict[str, Any]:
        return {
            "model": cpu_state(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": cpu_state(self.ema.module.state_dict()) if self.ema is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "rng": checkpoint.rng_state(),
            "train_cfg": to_dict(self.cfg),
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                log.warning("last.pt has no EMA weights; EMA restarts from the current weights")
                self.ema.set(self.model)
            else:
                self.ema.module.load_state_dict(ckpt["ema"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best_score, self.best_epoch = ckpt["best_score"], int(ckpt["best_epoch"])
        self.history = list(ckpt["history"])
        checkpoint.set_rng_state(ckpt["rng"])

    def to_device(self, tensor: torch.Tensor, image: bool = False) -> torch.Tensor:
        if image and self.channels_last and tensor.ndim == 4:
            return tensor.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return tensor.to(self.device, non_blocking=True)


def _train_epoch(
    run: _Run, loader: Iterable[dict], loss_fn: Callable, epoch: int, progress: bool
) -> dict[str, float]:
    cfg, plan, model, opt = run.cfg, run.plan, run.model, run.optimizer
    model.train()
    loss_sum = torch.zeros((), device=run.device)
    images_seen, batches, lr, running = 0, 0, opt.param_groups[0]["lr"], math.nan
    bar = tqdm(
        total=plan.batches_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress
    )
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        if i >= plan.batches_per_epoch:
            break
        images = run.to_device(batch["image"], image=True)
        target = run.to_device(batch["target"])
        try:
            with amp_autocast(run.device, cfg.amp):
                loss = loss_fn(model(images), target)
            run.scaler.scale(loss / plan.group_size(i)).backward()
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError(
                f"CUDA out of memory at train.batch_size={cfg.batch_size} with images of shape "
                f"{tuple(images.shape)}: lower train.batch_size (and raise train.accum_steps to keep "
                "the effective batch) or lower data.img_size"
            ) from exc
        loss_sum += loss.detach().float()
        images_seen += images.shape[0]
        batches = i + 1
        if batches % cfg.accum_steps == 0 or batches == plan.batches_per_epoch:
            if cfg.clip_grad is not None:
                run.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            lr = opt.param_groups[0]["lr"]
            run.scaler.step(opt)
            run.scaler.update()
            opt.zero_grad(set_to_none=True)
            run.scheduler.step()
            run.step += 1
            if run.ema is not None:
                run.ema.update(model, step=run.step)
        if batches % LOG_EVERY == 0 or batches == plan.batches_per_epoch:
            running = loss_sum.item() / batches  # one GPU sync every LOG_EVERY batches
            if not math.isfinite(running):
                raise RuntimeError(
                    f"epoch {epoch}, batch {batches}: the training loss is {running}; lower train.lr, "
                    "keep train.clip_grad on, or check the targets are 0/1 floats"
                )
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{running:.4f}", img_s=f"{images_seen / elapsed:.1f}", lr=f"{lr:.2e}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    if batches < plan.batches_per_epoch:
        raise RuntimeError(
            f"the train loader yielded {batches} batches in epoch {epoch}, expected {plan.batches_per_epoch}"
        )
    return {
        "train_loss": running,
        "lr": lr,
        "images_per_s": images_seen / max(seconds, 1e-9),
        "train_seconds": seconds,
    }


def _validate(run: _Run, validate: Validate, epoch: int, monitor: str) -> dict[str, float]:
    model = run.eval_model
    model.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in validate(model, epoch).items()}
    run.model.train()
    if monitor not in metrics:
        raise KeyError(f"validate() returned {sorted(metrics)} but the monitored metric is '{monitor}'")
    return metrics


def _finished(out_dir: Path, ckpt: dict[str, Any]) -> FitResult:
    log.info("%s: already trained for %d epochs (last.pt); nothing to do", out_dir, ckpt["epoch"])
    return FitResult(out_dir, ckpt["best_score"], int(ckpt["best_epoch"]), 0, list(ckpt["history"]))


def _warn_changed(saved: dict[str, Any], cfg: TrainCfg) -> None:
    now = to_dict(cfg)
    changed = [k for k in now if saved.get(k) != now[k]]
    if changed:
        log.warning("resuming with changed train settings: %s", ", ".join(f"{k}={now[k]!r}" for k in changed))


def fit(
    model: nn.Module,
    train_loader: Iterable[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: TrainCfg,
    out_dir: Path,
    *,
    validate: Validate | None = None,
    monitor: str = "score",
    config_text: str | None = None,
    resume: bool = True,
    device: torch.device | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs; write best.pt, last.pt, metrics.csv, config.yaml.

    Each batch is a dict with ``"image"`` (B, C, H, W) float and ``"target"``; the loss is
    ``loss_fn(model(image), target)``. ``validate(model, epoch)`` gets the model in eval mode
    on the device (the EMA copy when ``cfg.ema``) under ``torch.no_grad()`` and returns
    metrics, ``monitor`` among them (higher is better); it runs every ``cfg.val_every`` epochs
    and at the last one. Without ``validate``, best.pt holds the last epoch's weights.
    With ``resume`` an unfinished run continues from ``out_dir/last.pt``, a finished one
    returns at once. On return ``model`` holds the last epoch's raw (non-EMA) weights; load
    best.pt with ``load_weights`` for inference.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or resolve_device(cfg.device)
    last_path = out_dir / LAST
    # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device
    ckpt = checkpoint.read(last_path) if resume and last_path.is_file() else None
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        return _finished(out_dir, ckpt)
    if config_text is not None:
        write_text(out_dir / "config.yaml", config_text)
    seed_everything(cfg.seed)
    plan = plan_steps(cfg, _loader_len(train_loader))
    run = _Run(model, cfg, plan, device)
    if ckpt is not None:
        _warn_changed(ckpt.get("train_cfg", {}), cfg)
        run.load(ckpt)
        log.info("%s: resuming after epoch %d (step %d)", out_dir, run.epoch, run.step)
    elif last_path.is_file() or (out_dir / BEST).is_file():
        log.warning("%s: starting over; the old best.pt is removed and last.pt overwritten", out_dir)
        (out_dir / BEST).unlink(missing_ok=True)
    log.info(
        "training on %s (%s): %d epochs x %d batches, %d optimizer steps, warm-up %d",
        device,
        run.dtype or torch.float32,
        cfg.epochs,
        plan.batches_per_epoch,
        plan.total_steps,
        plan.warmup_steps,
    )
    first = run.epoch + 1
    for epoch in range(first, cfg.epochs + 1):
        start = time.perf_counter()
        balance_threads()  # parallel folds on a CPU: take the cores of folds that have finished
        _seed_epoch(cfg.seed, epoch)
        _set_epoch(train_loader, epoch)
        row: dict[str, float] = {"epoch": epoch, **_train_epoch(run, train_loader, loss_fn, epoch, progress)}
        score = None
        if validate is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            metrics = _validate(run, validate, epoch, monitor)
            row.update(metrics)
            score = metrics[monitor]
        row["seconds"] = time.perf_counter() - start
        run.epoch = epoch
        run.history.append(row)
        improved = (
            score is not None and math.isfinite(score) and (run.best_score is None or score > run.best_score)
        )
        if validate is None or improved:
            run.best_score, run.best_epoch = score, epoch
            best = {"model": cpu_state(run.eval_model.state_dict()), "epoch": epoch, "score": score}
            checkpoint.save(out_dir / BEST, best)
        checkpoint.save(last_path, run.state())
        _write_metrics(out_dir / "metrics.csv", run.history)
        log.info(
            "epoch %d/%d: %s",
            epoch,
            cfg.epochs,
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
        )
    if not (out_dir / BEST).is_file():  # every validation score was NaN
        log.warning("%s: no finite '%s' in any epoch; best.pt holds the last epoch", out_dir, monitor)
        checkpoint.save(
            out_dir / BEST,
            {"model": cpu_state(run.eval_model.state_dict()), "epoch": run.epoch, "score": None},
        )
    return FitResult(out_dir, run.best_score, run.best_epoch, cfg.epochs - first + 1, run.history)


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    import pandas as pd

    write_csv(path, pd.DataFrame(history))
