"""Several folds at once on a CPU: one worker process per running fold, the cores shared.

Small networks on a few CPU cores leave cores idle when folds run one after another:
convolutions of a few dozen channels scale poorly across threads, and a fold's data
preparation, validation metric and out-of-fold writing run on one core. Side by side, each
fold keeps one core busy. The gain is modest on 2 cores (``python -m stages.bench_folds``
measures it: see the README); with more cores more folds fit side by side (not measured:
every machine here has 2).

Each running fold is a fresh (spawned) process. The parent keeps ``running`` = the number
of folds in progress, and the engine re-splits the cores before every epoch
(:func:`pipeline.runtime.balance_threads`), so the last fold finishes with every core.
With a CUDA GPU the folds run one after another in this process: they would only queue
for the one device. Results do not depend on the job count (each fold seeds itself).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline.runtime import available_cores, configure_runtime, share_cores

log = logging.getLogger(__name__)

TrainFn = Callable[..., Path]  # train(cfg, fold, progress=...) -> run folder
Fold = int | str


def resolve_jobs(jobs: int | str, n_folds: int) -> int:
    """How many folds to train at once: ``auto`` is 1 with a CUDA GPU, else one per core.

    Never more than ``n_folds``; an explicit number must be at least 1.
    """
    if str(jobs) == "auto":
        import torch

        wanted = 1 if torch.cuda.is_available() else available_cores()
    else:
        try:
            wanted = int(jobs)
        except ValueError:
            raise ValueError(f"--jobs must be a positive number or 'auto', got '{jobs}'") from None
        if wanted < 1:
            raise ValueError(f"--jobs must be a positive number or 'auto', got '{jobs}'")
    return max(1, min(wanted, n_folds))


class _FoldTag(logging.Filter):
    """Prefixes a worker's log lines with its fold, so interleaved lines stay readable."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[{self.tag}] {record.msg}"
        return True


def _init_worker(running: Any, cores: int, log_level: str) -> None:
    configure_runtime(threads=1, log_level=log_level)
    share_cores(running, cores)


def _run_fold(train: TrainFn, cfg: Any, fold: Fold) -> Path:
    tag = _FoldTag(f"{cfg.name} fold {fold}")
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(tag)
    try:
        return train(cfg, fold, progress=False)
    finally:
        for handler in handlers:
            handler.removeFilter(tag)


def run_folds(
    train: TrainFn, cfg: Any, folds: Sequence[Fold], jobs: int = 1, desc: str = "folds"
) -> list[Path]:
    """``train(cfg, fold)`` for every fold, ``jobs`` at a time; run folders in ``folds`` order.

    ``train`` must be a module-level function (it is sent to the worker processes by name).
    A failing fold stops the others that have not started and raises with its number.
    """
    folds = list(folds)
    jobs = max(1, min(jobs, len(folds)))
    if jobs == 1:
        return [train(cfg, fold) for fold in folds]
    context = multiprocessing.get_context("spawn")
    running = context.Value("i", jobs)
    cores = available_cores()
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    log.info("training %d folds, %d at a time, sharing %d cores", len(folds), jobs, cores)
    results: dict[Fold, Path] = {}
    with (
        ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_init_worker, initargs=(running, cores, level)
        ) as pool,
        tqdm(total=len(folds), desc=desc, unit="fold") as bar,
    ):
        pending = {pool.submit(_run_fold, train, cfg, fold): fold for fold in folds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                fold = pending.pop(future)
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"{cfg.name} fold {fold} failed: {error}") from error
                results[fold] = future.result()
                bar.update(1)
            with running.get_lock():  # the workers read it before each epoch
                running.value = max(1, min(jobs, len(pending)))
    return [results[fold] for fold in folds]
