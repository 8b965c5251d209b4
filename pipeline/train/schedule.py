"""Per-optimizer-step learning-rate schedule: linear warm-up, then cosine down to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import ConfigError, TrainCfg


@dataclass(frozen=True)
class StepPlan:
    """How many batches and optimizer steps an epoch and a run take."""

    batches_per_epoch: int  # len(loader), capped by max_steps_per_epoch
    accum_steps: int
    epochs: int
    warmup_epochs: float

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (a last partial accumulation group still steps)."""
        return math.ceil(self.batches_per_epoch / self.accum_steps)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return min(self.total_steps, round(self.warmup_epochs * self.steps_per_epoch))

    def group_size(self, batch: int) -> int:
        """Number of batches in the accumulation group of 0-based ``batch`` (the last may be short)."""
        start = (batch // self.accum_steps) * self.accum_steps
        return min(self.accum_steps, self.batches_per_epoch - start)


def plan_steps(cfg: TrainCfg, loader_len: int | None) -> StepPlan:
    """The step plan for ``cfg`` over a loader of ``loader_len`` batches (None: unsized)."""
    # train.* ranges are checked when the config is loaded (pipeline.config.CHECKS)
    cap = cfg.max_steps_per_epoch
    if loader_len is None:
        if cap is None:
            raise ConfigError("the train loader has no len(); set train.max_steps_per_epoch")
        batches = cap
    else:
        batches = loader_len if cap is None else min(loader_len, cap)
    if batches < 1:
        raise ConfigError(
            "the train loader yields no batch (empty dataset or batch_size > dataset with drop_last)"
        )
    return StepPlan(batches, cfg.accum_steps, cfg.epochs, cfg.warmup_epochs)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at 0-based optimizer ``step``.

    Warm-up: (step + 1) / warmup_steps, reaching 1 at the last warm-up step. Then a cosine from
    1 at ``warmup_steps`` to ``min_lr_ratio`` at the last step (``total_steps - 1``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, plan: StepPlan, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step (its state_dict is plain numbers)."""

    def factor(step: int) -> float:
        return lr_factor(step, plan.warmup_steps, plan.total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
