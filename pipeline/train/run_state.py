"""The state of one training run: model, optimizer, schedule, gradient scaler and EMA.

:class:`TrainRun` builds them from ``train.*`` (AdamW without weight decay on biases and norm
weights, timm's rule; the warm-up + cosine schedule of :mod:`pipeline.train.schedule`; a GradScaler
for fp16; timm's EMA), takes one batch's forward/backward and one optimizer step, and turns it all
into the ``last.pt`` dict and back (resume). The loop over epochs is :func:`pipeline.train.engine.fit`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import TrainCfg, to_dict
from pipeline.device import amp_autocast, amp_dtype
from pipeline.train import checkpoint, distributed
from pipeline.train.checkpoint import cpu_state
from pipeline.train.schedule import StepPlan, build_scheduler

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> scalar loss


class TrainRun:
    """Model, optimizer, schedule, scaler and EMA of one fit, their checkpoint state, and one optimizer step."""

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

    def backward(
        self, loss_fn: LossFn, batch: dict[str, Any], index: int, steps: bool
    ) -> tuple[torch.Tensor, int]:
        """Forward and backward of batch ``index`` of an epoch (scaled for its accumulation group).

        ``steps``: the batch ends an accumulation group (under DDP only that backward averages the
        gradients across processes). Returns (the detached loss, the batch's image count).
        """
        images = self.to_device(batch["image"], image=True)
        target = self.to_device(batch["target"])
        net = self.net  # DDP under torchrun (world > 1)
        sync = (
            net.no_sync()
            if isinstance(net, DistributedDataParallel) and not steps
            else contextlib.nullcontext()
        )
        try:
            with sync:
                with amp_autocast(self.device, self.cfg.amp):
                    loss = loss_fn(self.net(images), target)
                self.scaler.scale(loss / self.plan.group_size(index)).backward()
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError(
                f"CUDA out of memory at train.batch_size={self.cfg.batch_size} with images of shape "
                f"{tuple(images.shape)}: lower train.batch_size (and raise train.accum_steps to keep "
                "the effective batch) or lower data.img_size"
            ) from exc
        return loss.detach().float(), int(images.shape[0])

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients, advance the schedule and the EMA; the learning rate used."""
        opt = self.optimizer
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        lr = float(opt.param_groups[0]["lr"])
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return lr
