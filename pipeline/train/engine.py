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
from pipeline.io import write_csv, write_text
from pipeline.runtime import balance_threads, seed_everything
from pipeline.train import checkpoint, distributed
from pipeline.train.checkpoint import BEST, LAST, cpu_state, load_weights
from pipeline.train.run_state import LossFn, TrainRun
from pipeline.train.schedule import plan_steps
from pipeline.train.tracker import NoTracker, start_tracker

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


def _train_epoch(
    run: TrainRun, loader: Iterable[dict], loss_fn: LossFn, epoch: int, progress: bool
) -> dict[str, float]:
    cfg, plan = run.cfg, run.plan
    run.net.train()
    loss_sum = torch.zeros((), device=run.device)
    images_seen, batches, lr, running = 0, 0, run.optimizer.param_groups[0]["lr"], math.nan
    bar = tqdm(
        total=plan.batches_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not progress
    )
    start = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        if i >= plan.batches_per_epoch:
            break
        steps = (i + 1) % cfg.accum_steps == 0 or i + 1 == plan.batches_per_epoch
        loss, images = run.backward(loss_fn, batch, i, steps)
        loss_sum += loss
        images_seen += images
        batches = i + 1
        if steps:
            lr = run.optimizer_step()
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


def _validate(run: TrainRun, validate: Validate, epoch: int, monitor: str) -> dict[str, float]:
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


def _start(
    model: nn.Module,
    cfg: TrainCfg,
    loader: Iterable[dict],
    ckpt: dict[str, Any] | None,
    out_dir: Path,
    device: torch.device,
) -> TrainRun:
    """The run's model, optimizer and schedule: fresh, or as ``last.pt`` (``ckpt``) left them."""
    seed_everything(cfg.seed)
    plan = plan_steps(cfg, _loader_len(loader))
    run = TrainRun(model, cfg, plan, device)
    if ckpt is not None:
        _warn_changed(ckpt.get("train_cfg", {}), cfg)
        run.load(ckpt)
        log.info("%s: resuming after epoch %d (step %d)", out_dir, run.epoch, run.step)
    elif distributed.is_main() and ((out_dir / LAST).is_file() or (out_dir / BEST).is_file()):
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
    return run


def _epoch(
    run: TrainRun,
    loader: Iterable[dict],
    loss_fn: LossFn,
    epoch: int,
    validate: Validate | None,
    monitor: str,
    progress: bool,
) -> tuple[dict[str, float], float | None]:
    """Train one epoch and validate when due (on rank 0; the others get its metrics): (row, score)."""
    cfg = run.cfg
    start = time.perf_counter()
    balance_threads()  # parallel folds on a CPU: take the cores of folds that have finished
    _seed_epoch(cfg.seed, epoch, distributed.rank())
    _set_epoch(loader, epoch)
    row: dict[str, float] = {"epoch": epoch, **_train_epoch(run, loader, loss_fn, epoch, progress)}
    score = None
    if validate is not None and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
        metrics = _validate(run, validate, epoch, monitor) if distributed.is_main() else None
        metrics = distributed.broadcast_object(metrics)  # the others wait here for rank 0
        row.update(metrics)
        score = metrics[monitor]
    row["seconds"] = time.perf_counter() - start
    run.epoch = epoch
    run.history.append(row)
    return row, score


def _keep_best(run: TrainRun, out_dir: Path, score: float | None, validated: bool) -> None:
    """A finite score above the best so far (or, without validation, every epoch) becomes best.pt."""
    improved = (
        score is not None and math.isfinite(score) and (run.best_score is None or score > run.best_score)
    )
    if validated and not improved:
        return
    run.best_score, run.best_epoch = score, run.epoch
    if distributed.is_main():
        best = {"model": cpu_state(run.eval_model.state_dict()), "epoch": run.epoch, "score": score}
        checkpoint.save(out_dir / BEST, best)


def fit(
    model: nn.Module,
    train_loader: Iterable[dict],
    loss_fn: LossFn,
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
    # on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device
    ckpt = checkpoint.read(out_dir / LAST) if resume and (out_dir / LAST).is_file() else None
    if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
        return _finished(out_dir, ckpt)
    if config_text is not None and main:
        write_text(out_dir / "config.yaml", config_text)
    run = _start(model, cfg, train_loader, ckpt, out_dir, device)
    first = run.epoch + 1
    tracker = start_tracker(cfg, out_dir, config_text, ckpt is not None) if main else NoTracker()
    for epoch in range(first, cfg.epochs + 1):
        row, score = _epoch(run, train_loader, loss_fn, epoch, validate, monitor, progress and main)
        _keep_best(run, out_dir, score, validated=validate is not None)
        if main:
            checkpoint.save(out_dir / LAST, run.state())
            _write_metrics(out_dir / "metrics.csv", run.history)
            tracker.log_epoch(epoch, row)
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
    tracker.finish(out_dir)
    ema = run.ema.module if run.ema is not None else None
    return FitResult(out_dir, run.best_score, run.best_epoch, cfg.epochs - first + 1, run.history, ema)


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    import pandas as pd

    write_csv(path, pd.DataFrame(history))
