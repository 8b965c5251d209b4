"""The one training loop shared by the classifier and the segmenters.

What differs between them (model, loss, data, validation metric) is passed in; this module
owns the optimizer, schedule, mixed precision, EMA, checkpoints and resume.

Reproducibility: before every epoch the engine reseeds Python / NumPy / torch from
``(cfg.seed, epoch)`` and calls ``set_epoch(epoch)`` on the loader's sampler / dataset when
they have one, so the data order and augmentations of an epoch do not depend on what ran
before it; a resumed CPU run therefore ends with the same weights as an uninterrupted one.
Epochs are numbered from 1; ``last.pt["epoch"]`` is the number of finished epochs.

Under torchrun (:mod:`pipeline.train.distributed`) each process trains its share of every batch
in DDP (gradients averaged at the last batch of an accumulation group, ``no_sync`` before it;
SyncBatchNorm with ``train.sync_bn`` on GPUs, else batch-norm statistics averaged every epoch);
only rank 0 validates and writes. Checkpoints hold the bare model, so N processes resume in 1 and
back; with other optimizer steps per epoch the schedule goes on from the next epoch's start.
"""

from __future__ import annotations

import contextlib
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
from pipeline.device import amp_autocast, amp_dtype
from pipeline.io import write_csv, write_text
from pipeline.runtime import balance_threads, seed_everything
from pipeline.train import checkpoint, distributed
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
    ema: nn.Module | None = None  # the EMA copy this call trained (cfg.ema), as validation saw it


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed from (seed, epoch); other processes than rank 0 add their rank (their own dropout draws)."""
    key = [seed, epoch] if rank == 0 else [seed, epoch, rank]
    seed_everything(int(np.random.SeedSequence(key).generate_state(1)[0]))


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
        self.world = distributed.world_size()
        if self.world > 1 and cfg.sync_bn:
            if device.type == "cuda":
                self.model = distributed.convert_sync_bn(self.model)
            else:
                log.warning(
                    "train.sync_bn: SyncBatchNorm needs GPUs; batch-norm statistics averaged per epoch"
                )
        self.dtype = amp_dtype(device, cfg.amp)
        # no weight decay on biases and norm weights (timm's rule)
        groups = param_groups_weight_decay(self.model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, plan, cfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.net = distributed.wrap_model(self.model, device)  # what trains: DDP under torchrun
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
            "world_size": self.world,
            "steps_per_epoch": self.plan.steps_per_epoch,
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
        saved = ckpt.get("steps_per_epoch")
        if saved is not None and int(saved) != self.plan.steps_per_epoch:
            old, now = (saved, ckpt.get("world_size", 1)), (self.plan.steps_per_epoch, self.world)
            log.warning(
                "last.pt took %d optimizer steps per epoch (%d process(es)), this run %d (%d): the "
                "schedule goes on from the start of epoch %d",
                *old,
                *now,
                self.epoch + 1,
            )
            self.move_schedule(self.epoch * self.plan.steps_per_epoch)

    def move_schedule(self, step: int) -> None:
        """Put the step count and the learning rates at optimizer step ``step`` of this run's plan."""
        self.step = step
        self.scheduler.last_epoch = step
        lambdas = self.scheduler.lr_lambdas
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, lambdas):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def sync_buffers(self) -> None:
        """The same batch-norm statistics (model and EMA) on every process, before validation and saving."""
        if self.world > 1 and not distributed.has_sync_bn(self.model):
            distributed.average_buffers(self.model)
            if self.ema is not None:
                distributed.average_buffers(self.ema.module)

    def to_device(self, tensor: torch.Tensor, image: bool = False) -> torch.Tensor:
        if image and self.channels_last and tensor.ndim == 4:
            return tensor.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return tensor.to(self.device, non_blocking=True)


def _train_epoch(
    run: _Run, loader: Iterable[dict], loss_fn: Callable, epoch: int, progress: bool
) -> dict[str, float]:
    cfg, plan, net, opt = run.cfg, run.plan, run.net, run.optimizer
    net.train()
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
        steps = (i + 1) % cfg.accum_steps == 0 or i + 1 == plan.batches_per_epoch
        # DDP averages the gradients over the processes at the last backward of a group only
        sync = net.no_sync() if run.world > 1 and not steps else contextlib.nullcontext()
        try:
            with sync:
                with amp_autocast(run.device, cfg.amp):
                    loss = loss_fn(net(images), target)
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
        if steps:
            if cfg.clip_grad is not None:
                run.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
            lr = opt.param_groups[0]["lr"]
            run.scaler.step(opt)
            run.scaler.update()
            opt.zero_grad(set_to_none=True)
            run.scheduler.step()
            run.step += 1
            if run.ema is not None:
                run.ema.update(run.model, step=run.step)
        if batches % LOG_EVERY == 0 or batches == plan.batches_per_epoch:
            running = loss_sum.item() / batches  # one GPU sync every LOG_EVERY batches
            _check_finite(running, epoch, batches)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{running:.4f}", img_s=f"{images_seen / elapsed:.1f}", lr=f"{lr:.2e}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    if batches < plan.batches_per_epoch:
        raise RuntimeError(
            f"the train loader yielded {batches} batches in epoch {epoch}, expected {plan.batches_per_epoch}"
        )
    run.sync_buffers()
    if run.world > 1:  # the mean loss and the images of every process
        seen = torch.tensor(float(images_seen), dtype=torch.float64, device=run.device)
        totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), seen]))
        running = totals[0].item() / (batches * run.world)
        images_seen = int(totals[1].item())
        _check_finite(running, epoch, batches)
    return {
        "train_loss": running,
        "lr": lr,
        "images_per_s": images_seen / max(seconds, 1e-9),
        "train_seconds": seconds,
    }


def _check_finite(loss: float, epoch: int, batches: int) -> None:
    if not math.isfinite(loss):
        raise RuntimeError(
            f"epoch {epoch}, batch {batches}: the training loss is {loss}; lower train.lr, "
            "keep train.clip_grad on, or check the targets are 0/1 floats"
        )


def _validate(run: _Run, validate: Validate, epoch: int, monitor: str) -> dict[str, float]:
    model = run.eval_model
    model.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in validate(model, epoch).items()}
    run.net.train()
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

    Under torchrun every process calls ``fit`` with its share of the data
    (:func:`pipeline.train.distributed.sampler_for`); ``validate`` runs on rank 0 only, whose
    metrics every process gets back; only rank 0 writes into ``out_dir``.
    """
    out_dir = Path(out_dir)
    main = distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.local_device(device or distributed.process_device(cfg.device))
    last_path = out_dir / LAST
    # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device
    ckpt = checkpoint.read(last_path) if resume and last_path.is_file() else None
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        return _finished(out_dir, ckpt)
    if config_text is not None and main:
        write_text(out_dir / "config.yaml", config_text)
    seed_everything(cfg.seed)
    plan = plan_steps(cfg, _loader_len(train_loader))
    run = _Run(model, cfg, plan, device)
    if ckpt is not None:
        _warn_changed(ckpt.get("train_cfg", {}), cfg)
        run.load(ckpt)
        log.info("%s: resuming after epoch %d (step %d)", out_dir, run.epoch, run.step)
    elif main and (last_path.is_file() or (out_dir / BEST).is_file()):
        log.warning("%s: starting over; the old best.pt is removed and last.pt overwritten", out_dir)
        (out_dir / BEST).unlink(missing_ok=True)
    log.info(
        "training on %s%s (%s): %d epochs x %d batches, %d optimizer steps, warm-up %d",
        device,
        f" x {run.world} processes" if run.world > 1 else "",
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
        _seed_epoch(cfg.seed, epoch, distributed.rank())
        _set_epoch(train_loader, epoch)
        row: dict[str, float] = {
            "epoch": epoch,
            **_train_epoch(run, train_loader, loss_fn, epoch, progress and main),
        }
        score = None
        if validate is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            metrics = _validate(run, validate, epoch, monitor) if main else None
            metrics = distributed.broadcast_object(metrics)  # the others wait here for rank 0
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
            if main:
                best = {"model": cpu_state(run.eval_model.state_dict()), "epoch": epoch, "score": score}
                checkpoint.save(out_dir / BEST, best)
        if main:
            checkpoint.save(last_path, run.state())
            _write_metrics(out_dir / "metrics.csv", run.history)
        log.info(
            "epoch %d/%d: %s",
            epoch,
            cfg.epochs,
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
        )
    if main and not (out_dir / BEST).is_file():  # every validation score was NaN
        log.warning("%s: no finite '%s' in any epoch; best.pt holds the last epoch", out_dir, monitor)
        checkpoint.save(
            out_dir / BEST,
            {"model": cpu_state(run.eval_model.state_dict()), "epoch": run.epoch, "score": None},
        )
    ema = run.ema.module if run.ema is not None else None
    return FitResult(out_dir, run.best_score, run.best_epoch, cfg.epochs - first + 1, run.history, ema)


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    import pandas as pd

    write_csv(path, pd.DataFrame(history))
