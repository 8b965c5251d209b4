"""Several folds at once: one worker process per running fold, the cores shared, a GPU each.

Small networks on a few CPU cores leave cores idle when folds run one after another:
convolutions of a few dozen channels scale poorly across threads, and a fold's data
preparation, validation metric and out-of-fold writing run on one core. Side by side, each
fold keeps one core busy. The gain is modest on 2 cores (``python -m stages.bench_folds``
measures it: see the README); with more cores more folds fit side by side (not measured:
every machine here has 2).

Each running fold is a fresh (spawned) process. The parent keeps ``running`` = the number
of folds in progress, and the engine re-splits the cores before every epoch
(:func:`pipeline.runtime.balance_threads`), so the last fold finishes with every core.
On a machine with several GPUs each worker is pinned to its own (``CUDA_VISIBLE_DEVICES`` set
in the worker before torch starts CUDA; round robin when there are more jobs than GPUs): one fold
per GPU, the nnU-Net maintainers' advice for small 2D models, often faster than one fold over
every GPU with DDP (``GPUS=n``, :mod:`pipeline.train.distributed`, where the jobs are 1). With a
single GPU the folds run one after another in this process: they would only queue for the one
device. Results do not depend on the job count (each fold seeds itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline.config import MemberConfig
from pipeline.runtime import available_cores, configure_runtime, share_cores
from pipeline.train.fold_data import Fold

log = logging.getLogger(__name__)

TrainFn = Callable[..., Path]  # train(cfg, fold, progress=...) -> run folder


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries ([] without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in listed.split(",") if d.strip()] if listed else [str(i) for i in range(count)]
    return names[:count]


def resolve_jobs(jobs: int | str, n_folds: int, processes: int = 1) -> int:
    """How many folds to train at once: ``auto`` is one per GPU (1 on one GPU), else one per core.

    Never more than ``n_folds``; an explicit number must be at least 1. Under torchrun
    (``processes`` > 1: every process trains each fold) only 1 is possible.
    """
    if processes > 1:
        if str(jobs) not in ("auto", "1"):
            raise ValueError(
                f"--jobs {jobs} with {processes} torchrun processes: each fold already trains on every "
                "GPU; use JOBS=1 with GPUS>1, or GPUS=1 with JOBS>1 for one fold per GPU"
            )
        return 1
    if str(jobs) == "auto":
        wanted = len(visible_gpus()) or available_cores()
    else:
        try:
            wanted = int(jobs)
        except ValueError:
            raise ValueError(f"--jobs must be a positive number or 'auto', got '{jobs}'") from None
        if wanted < 1:
            raise ValueError(f"--jobs must be a positive number or 'auto', got '{jobs}'")
    return max(1, min(wanted, n_folds))


def gpu_for_worker(slot: int, gpus: Sequence[str]) -> str | None:
    """The GPU of the ``slot``-th worker process (0-based): round robin over ``gpus``; None without."""
    return gpus[slot % len(gpus)] if gpus else None


class _FoldTag(logging.Filter):
    """Prefixes a worker's log lines with its fold, so interleaved lines stay readable."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[{self.tag}] {record.msg}"
        return True


def die_with_parent() -> None:
    """Ask the kernel to end this process when its parent dies (Linux; elsewhere nothing): a fold worker
    whose stage was killed must not train on, writing into a run folder another run may then own."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the call: nobody will signal
        os.kill(os.getpid(), signal.SIGTERM)


def _init_worker(running: Any, cores: int, log_level: str, started: Any, gpus: list[str]) -> None:
    die_with_parent()
    with started.get_lock():
        slot = started.value
        started.value += 1
    gpu = gpu_for_worker(slot, gpus)
    if gpu is not None:  # before this process starts CUDA: the fold sees one device, cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    configure_runtime(threads=1, log_level=log_level)
    share_cores(running, cores)


def _run_fold(train: TrainFn, cfg: MemberConfig, fold: Fold) -> Path:
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
    train: TrainFn,
    cfg: MemberConfig,
    folds: Sequence[Fold],
    jobs: int = 1,
    desc: str = "folds",
    gpus: Sequence[str] | None = None,
) -> list[Path]:
    """``train(cfg, fold)`` for every fold, ``jobs`` at a time; run folders in ``folds`` order.

    ``train`` must be a module-level function (it is sent to the worker processes by name).
    A failing fold stops the others that have not started and raises with its number. With
    ``jobs`` > 1 each worker is pinned to one of ``gpus`` (default: :func:`visible_gpus`).
    """
    folds = list(folds)
    jobs = max(1, min(jobs, len(folds)))
    if jobs == 1:
        return [train(cfg, fold) for fold in folds]
    context = multiprocessing.get_context("spawn")
    running = context.Value("i", jobs)
    started = context.Value("i", 0)
    gpus = list(visible_gpus() if gpus is None else gpus)
    cores = available_cores()
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    log.info(
        "training %d folds, %d at a time, sharing %d cores%s",
        len(folds),
        jobs,
        cores,
        f", one of GPUs {','.join(gpus)} each" if gpus else "",
    )
    results: dict[Fold, Path] = {}
    with (
        ProcessPoolExecutor(
            jobs,
            mp_context=context,
            initializer=_init_worker,
            initargs=(running, cores, level, started, gpus),
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
