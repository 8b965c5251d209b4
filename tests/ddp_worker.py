"""Run by tests/test_ddp.py under torchrun (2 CPU processes, gloo): ``engine.fit`` under DDP.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT``
trains the scenarios below into ``OUT/<scenario>``; every process dumps what the test compares
(model and EMA weights, history, validation and ``no_sync`` calls) into
``OUT/dumps/<scenario>_rank<r>.pt``. The tiny model, data and config live here and are imported
by the test for its one-process twins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.config import TrainCfg
from pipeline.train import distributed
from pipeline.train.engine import fit

WORLD = 2
N = 16  # items; 2 processes x batches of 2 = the global batch of 4 of one process
BATCH = 2
CFG = TrainCfg(
    epochs=2,
    batch_size=BATCH,
    lr=1e-2,
    warmup_epochs=0.5,
    device="cpu",
    seed=3,
    ema=True,
    ema_decay=0.5,
    clip_grad=0.5,
    channels_last=False,
    num_workers=0,
)
TIMING = ("images_per_s", "train_seconds", "seconds")
CRASH_AT = N // (WORLD * BATCH) + 1  # the first batch of epoch 2 under DDP


class Keyed(Dataset):
    """Random images and masks; an item's noise is drawn from its (epoch, index) key, like SliceDataset."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, 8, 8, generator=g)
        self.y = (torch.rand(n, 3, 8, 8, generator=g) > 0.6).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key
        noise = torch.randn(self.x[i].shape, generator=torch.Generator().manual_seed(1000 * epoch + i))
        return {"image": self.x[i] + 0.1 * noise, "target": self.y[i]}


def group_norm_model(seed: int = 0) -> nn.Module:
    """No layer that mixes the samples of a batch: DDP must equal one process on the global batch."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 3, 1))


def batch_norm_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Conv2d(8, 3, 1))


def make_loader(batch_size: int, seed: int = CFG.seed) -> DataLoader:
    """This process's loader: its share of every global batch under torchrun, all of it otherwise."""
    data = Keyed()
    sampler = distributed.sampler_for(len(data), seed, drop_last=True)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)


def bce() -> nn.Module:
    return nn.BCEWithLogitsLoss()


def scorer(calls: list[int] | None = None):
    probe = Keyed().x

    def validate(model: nn.Module, epoch: int) -> dict[str, float]:
        if calls is not None:
            calls.append(epoch)
        return {"score": -float(model(probe).abs().mean())}

    return validate


class Crash(nn.Module):
    """BCE that stops the run (every process at the same batch) at its ``at``-th call: a killed run."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls, self.loss = at, 0, nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.loss(logits, target)


def dump(out: Path, name: str, model: nn.Module, result, **extra) -> None:
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in result.history]
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in result.ema.state_dict().items()} if result.ema else None,
        "history": rows,
        "best_epoch": result.best_epoch,
        **extra,
    }
    (out / "dumps").mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "dumps" / f"{name}_rank{distributed.rank()}.pt")


@contextlib.contextmanager
def counting_no_sync(counter: list[int]):
    """Count the batches DistributedDataParallel runs under ``no_sync``."""
    from torch.nn.parallel import DistributedDataParallel

    original = DistributedDataParallel.no_sync

    @contextlib.contextmanager
    def no_sync(self):
        counter.append(1)
        with original(self):
            yield

    DistributedDataParallel.no_sync = no_sync
    try:
        yield
    finally:
        DistributedDataParallel.no_sync = original


def main(out: Path) -> None:
    rank = distributed.rank()
    if distributed.world_size() != WORLD:
        raise SystemExit(f"expected {WORLD} processes, got {distributed.world_size()}")

    # (a, f) plain: compared with one process on batches of 4
    calls: list[int] = []
    model = group_norm_model()
    result = fit(model, make_loader(BATCH), bce(), CFG, out / "plain", validate=scorer(calls), progress=False)
    dump(out, "plain", model, result, validate_calls=calls)

    # (e) accumulation of 2 batches under no_sync: compared with one process on batches of 8
    syncless: list[int] = []
    model = group_norm_model()
    with counting_no_sync(syncless):
        result = fit(model, make_loader(BATCH), bce(), dataclasses.replace(CFG, accum_steps=2), out / "accum")
    dump(out, "accum", model, result, no_sync=len(syncless))

    # (b, f) batch norm + dropout, a folder per process: only rank 0's gets files
    calls = []
    model = batch_norm_model()
    solo = out / "solo" / f"rank{rank}"
    cfg = dataclasses.replace(CFG, sync_bn=True)  # SyncBatchNorm needs GPUs: a warning, then averaging
    result = fit(model, make_loader(BATCH), bce(), cfg, solo, validate=scorer(calls), config_text="x: 1\n")
    dump(out, "solo", model, result, validate_calls=calls)

    # (c) killed in epoch 2, resumed: compared with plain; its epoch-1 last.pt goes on in one process
    try:
        fit(group_norm_model(), make_loader(BATCH), Crash(CRASH_AT), CFG, out / "cut", validate=scorer())
        raise SystemExit("the planted crash did not happen")
    except KeyboardInterrupt:
        pass
    if distributed.is_main():
        (out / "to1").mkdir()
        shutil.copy(out / "cut" / "last.pt", out / "to1" / "last.pt")
    distributed.barrier()
    model = group_norm_model(seed=7)  # resume loads the weights: the initial ones do not matter
    result = fit(model, make_loader(BATCH), bce(), CFG, out / "cut", validate=scorer())
    dump(out, "cut", model, result, epochs_run=result.epochs_run)

    # (d) the test wrote from1/last.pt with one process (batches of 4, epoch 1): DDP goes on
    model = group_norm_model(seed=7)
    result = fit(model, make_loader(BATCH), bce(), CFG, out / "from1", validate=scorer())
    dump(out, "from1", model, result, epochs_run=result.epochs_run)


if __name__ == "__main__":
    with distributed.session("cpu"):
        main(Path(sys.argv[1]))
