"""Training on several processes with torchrun + DistributedDataParallel (``make train-seg GPUS=2``).

``torchrun --standalone --nproc_per_node=N -m stages.train_seg ...`` starts N copies of the stage;
each reads its place from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
:func:`session` joins them into one process group (NCCL on GPUs, gloo on a CPU) and pins each to
its GPU; outside torchrun it does nothing, and every helper here answers as for one process
(rank 0 of 1), so the same code runs both ways.

Who does what: every process trains on its share of each batch (the engine wraps the model in
DDP, gradients are averaged); only rank 0 validates, writes checkpoints, metrics, the config, the
out-of-fold predictions and logs (the others log errors only); the others wait for it at the next
collective (:data:`TIMEOUT` bounds that wait).

Data: :class:`ShardedEpochSampler` deals the order of :class:`~pipeline.data.torch_sets.EpochSampler`
(same ``(seed, epoch)`` order, same ``(epoch, index)`` keys) out to the processes, so with
``train.batch_size`` = B per process the N processes' g-th batches together are the g-th batch of
one process with batches of N x B: ``train.batch_size`` is per process, the effective batch is
``batch_size x N x accum_steps``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from pipeline.config import ConfigError
from pipeline.data.torch_sets import EpochSampler
from pipeline.device import resolve_device
from pipeline.io import run_lock
from pipeline.runtime import available_cores

log = logging.getLogger(__name__)

# how long a process waits at a collective: rank 0 validates and writes the out-of-fold
# predictions of a fold while the others wait (NCCL's own default, 10 minutes, is too short)
TIMEOUT = datetime.timedelta(minutes=60)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# --------------------------------------------------------------------------- where am I


def launched_world() -> int:
    """Processes torchrun started (``WORLD_SIZE``), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes files and logs (always true outside torchrun)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------- process group


def process_device(name: str) -> torch.device:
    """``train.device`` for this process: under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``."""
    device = resolve_device(name)
    if device.type != "cuda" or launched_world() <= 1:
        return device
    if device.index is not None:
        raise ConfigError(
            f"train.device is '{name}', one GPU, but torchrun started {launched_world()} processes that each "
            "take their own: set train.device to auto or cuda"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = torch.cuda.device_count()
    if local >= visible:
        raise ConfigError(
            f"GPUS={os.environ.get('LOCAL_WORLD_SIZE', launched_world())} but only {visible} GPU(s) are visible: "
            f"use GPUS={visible} or fewer"
        )
    return torch.device("cuda", local)


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index as this process's own GPU under torchrun (the one :func:`setup` pinned)."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def setup(device_name: str = "auto") -> bool:
    """Join torchrun's process group (NCCL for CUDA, gloo for the CPU); False outside torchrun.

    Also pins this process to its GPU, gives it its share of the CPU cores, and leaves the
    logging of ranks above 0 at errors only.
    """
    if launched_world() <= 1 or is_distributed():
        return False
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start the stage with torchrun"
        )
    device = process_device(device_name)
    kwargs: dict[str, Any] = {"timeout": TIMEOUT}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs.update(backend="nccl", device_id=device)
    else:
        kwargs.update(backend="gloo")
    dist.init_process_group(**kwargs)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    torch.set_num_threads(max(1, available_cores() // local_world))
    if not is_main():
        logging.getLogger().setLevel(logging.ERROR)
    log.info(
        "process group: %d processes (%s), rank 0 writes the files", dist.get_world_size(), kwargs["backend"]
    )
    return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_name: str = "auto") -> Iterator[bool]:
    """:func:`setup` on entry; on exit the processes meet once more and leave the group.

    Yields whether a process group was started (False outside torchrun: nothing happens).
    """
    started = setup(device_name)
    try:
        yield started
        if started:
            barrier()  # rank 0 may still be writing the last fold's out-of-fold predictions
    finally:
        if started:
            teardown()


# --------------------------------------------------------------------------- data


class ShardedEpochSampler(EpochSampler):
    """This process's share of :class:`EpochSampler`'s epoch: positions ``rank, rank + world, ...``.

    The epoch's order is first cut (``drop_last``) or wrapped round (else) to a multiple of
    ``world``, so every process yields as many ``(epoch, index)`` keys. With batches of B per
    process, the processes' g-th batches together are positions ``g*world*B .. (g+1)*world*B - 1``
    of the order: the g-th batch of one process with batches of ``world * B``.
    """

    def __init__(
        self, n: int, seed: int, rank: int, world: int, shuffle: bool = True, drop_last: bool = False
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        super().__init__(n, seed, shuffle)
        self.rank, self.world, self.drop_last = rank, world, drop_last

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order()
        total = len(self) * self.world
        order = order[:total] if self.drop_last else np.resize(order, total)
        return iter([(self.epoch, int(i)) for i in order[self.rank :: self.world]])

    def __len__(self) -> int:
        return self.n // self.world if self.drop_last else math.ceil(self.n / self.world)


def sampler_for(n: int, seed: int, *, shuffle: bool = True, drop_last: bool = False) -> Sampler:
    """The training sampler of this process: :class:`EpochSampler`, or its share under torchrun.

    ``drop_last`` (for the sharded one) cuts the epoch to a multiple of the process count; pass
    the DataLoader's own ``drop_last`` so N processes see exactly one process's global batches.
    """
    if not is_distributed():
        return EpochSampler(n, seed, shuffle)
    return ShardedEpochSampler(n, seed, rank(), world_size(), shuffle, drop_last)


# --------------------------------------------------------------------------- model


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Batch-norm layers as SyncBatchNorm (timm's norm+act layers keep their activation).

    A batch-norm layer with forward pre-hooks is left as it is: conversion makes a new module and
    would drop them (the frozen encoder stages of :mod:`pipeline.models.segmenter` stay in eval
    mode through such a hook, and use stored statistics: nothing to synchronise).
    """
    from timm.layers import convert_sync_batchnorm

    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        if isinstance(model, nn.SyncBatchNorm) or model._forward_pre_hooks:
            return model
        return convert_sync_batchnorm(model)
    for name, child in model.named_children():
        new = convert_sync_bn(child)
        if new is not child:
            model.add_module(name, new)
    return model


def has_sync_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` (already on ``device``) in DistributedDataParallel; itself outside a process group."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


# --------------------------------------------------------------------------- collectives


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the processes (in place; the tensor itself outside a process group)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (batch-norm statistics) over the processes, in place.

    Without SyncBatchNorm each process's running statistics follow its own share of the batches;
    the mean makes every process hold the same model (and EMA) before rank 0 validates and saves.
    """
    if not is_distributed():
        return
    world = world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every process (``obj`` itself outside a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_lock(folder: str | os.PathLike) -> contextlib.AbstractContextManager:
    """:func:`pipeline.io.run_lock` on rank 0; the other processes of its run write nothing."""
    return run_lock(folder) if is_main() else contextlib.nullcontext(Path(folder))
