"""Training on several processes (pipeline.train.distributed + the engine under DDP).

One torchrun launch of 2 CPU processes (gloo) runs tests/ddp_worker.py; its weights are compared
with one-process twins trained here on the same global batches, its files with what rank 0 alone
may write. The helpers are also checked outside a process group, and the launch recipes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import BATCH, CFG, CRASH_AT, WORLD, Crash, N, bce, group_norm_model, make_loader, scorer
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from torch import nn

from pipeline.config import ConfigError
from pipeline.data.torch_sets import EpochSampler
from pipeline.device import amp_dtype
from pipeline.io import LOCK_FILE
from pipeline.models.segmenter import _stay_in_eval
from pipeline.train import distributed
from pipeline.train.checkpoint import load_weights
from pipeline.train.distributed import ShardedEpochSampler, convert_sync_bn, sampler_for
from pipeline.train.engine import fit

ROOT = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-4, "atol": 1e-6}  # DDP sums the gradients of a batch in another order


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), **TOL) for k in a)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)[key]


def single(out: Path, batch_size: int = WORLD * BATCH, **changes) -> nn.Module:
    """The one-process twin: the same data, model and config on batches of ``batch_size``."""
    model = group_norm_model()
    fit(model, make_loader(batch_size), bce(), dataclasses.replace(CFG, **changes), out, validate=scorer())
    return model


# --------------------------------------------------------------------------- the torchrun launch


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's scenarios under torchrun; before it, from1/last.pt written by one process."""
    out = tmp_path_factory.mktemp("ddp")
    with pytest.raises(KeyboardInterrupt):  # one process, batches of 4, killed in epoch 2
        fit(group_norm_model(), make_loader(WORLD * BATCH), Crash(CRASH_AT), CFG, out / "from1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    done = subprocess.run(
        [*command, str(ROOT / "tests" / "ddp_worker.py"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """One process on the global batches of 4: the model and its run folder."""
    out = tmp_path_factory.mktemp("one")
    return single(out), out


def dumped(out: Path, name: str) -> list[dict]:
    return [torch.load(out / "dumps" / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_equals_one_process_on_the_global_batch(ddp: Path, twin: tuple[nn.Module, Path]) -> None:
    model, folder = twin
    ranks = dumped(ddp, "plain")
    assert close(ranks[0]["model"], model.state_dict())
    assert close(state(ddp / "plain" / "last.pt"), state(folder / "last.pt"))
    assert close(state(ddp / "plain" / "last.pt", "ema"), state(folder / "last.pt", "ema"))
    one = torch.load(folder / "last.pt", weights_only=True)
    last = torch.load(ddp / "plain" / "last.pt", weights_only=True)
    assert (last["step"], last["world_size"], one["world_size"]) == (one["step"], WORLD, 1)
    for a, b in zip(ranks[0]["history"], one["history"], strict=True):  # the loss of the global batch
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])


def test_every_process_holds_the_same_model_and_ema(ddp: Path) -> None:
    for name in ("plain", "solo"):  # solo: batch norm without SyncBatchNorm (CPU), averaged per epoch
        first, second = dumped(ddp, name)
        assert equal(first["model"], second["model"]), name
        assert equal(first["ema"], second["ema"]), name
        assert not equal(first["ema"], first["model"])
        assert first["history"] == second["history"]  # rank 0's validation reached every process
    solo = state(ddp / "solo" / "rank0" / "last.pt")
    assert equal(solo, dumped(ddp, "solo")[1]["model"])


def test_only_rank_0_validates_and_writes(ddp: Path) -> None:
    written = sorted(p.name for p in (ddp / "solo" / "rank0").iterdir())
    assert written == ["best.pt", "config.yaml", "last.pt", "metrics.csv"]
    assert not (ddp / "solo" / "rank1").exists()
    first, second = dumped(ddp, "solo")
    assert (first["validate_calls"], second["validate_calls"]) == ([1, 2], [])


def test_accumulation_under_no_sync_equals_a_big_batch(ddp: Path, tmp_path: Path) -> None:
    twin = single(tmp_path / "big", batch_size=WORLD * BATCH * 2)  # 8 at once, no accumulation
    ranks = dumped(ddp, "accum")
    assert close(ranks[0]["model"], twin.state_dict())
    batches = N // (WORLD * BATCH)
    assert [r["no_sync"] for r in ranks] == [CFG.epochs * batches // 2] * WORLD  # the first of each pair


def test_resume_under_ddp_continues_exactly(ddp: Path) -> None:
    whole, cut = dumped(ddp, "plain")[0], dumped(ddp, "cut")[0]
    assert cut["epochs_run"] == 1
    assert equal(whole["model"], cut["model"]) and equal(whole["ema"], cut["ema"])
    assert whole["history"] == cut["history"]
    a = torch.load(ddp / "plain" / "last.pt", weights_only=True)
    b = torch.load(ddp / "cut" / "last.pt", weights_only=True)
    assert equal(a["model"], b["model"]) and a["step"] == b["step"]


def test_checkpoints_move_between_process_counts(ddp: Path, twin: tuple[nn.Module, Path]) -> None:
    # one process -> DDP: from1/last.pt (epoch 1, one process) finished by 2 processes
    from1 = dumped(ddp, "from1")[0]
    assert from1["epochs_run"] == 1
    assert close(from1["model"], twin[0].state_dict())
    # DDP -> one process: the epoch-1 last.pt of the killed DDP run finished here
    resumed = group_norm_model(seed=7)
    result = fit(resumed, make_loader(WORLD * BATCH), bce(), CFG, ddp / "to1", validate=scorer())
    assert result.epochs_run == 1
    assert close(resumed.state_dict(), dumped(ddp, "plain")[0]["model"])
    # the weights are the bare model's: no "module." prefix
    bare = group_norm_model(seed=9)
    load_weights(ddp / "plain" / "best.pt", bare)
    assert not any(k.startswith("module.") for k in state(ddp / "plain" / "last.pt"))


# --------------------------------------------------------------------------- without a process group


def test_sharded_sampler_deals_out_the_global_batches() -> None:
    n, seed, world, batch = 11, 5, 3, 2
    whole = EpochSampler(n, seed)
    for drop_last in (True, False):
        shards = [ShardedEpochSampler(n, seed, r, world, drop_last=drop_last) for r in range(world)]
        for epoch in (1, 2):
            whole.set_epoch(epoch)
            for s in shards:
                s.set_epoch(epoch)
            order = [i for _, i in whole]
            length = len(shards[0]) * world  # the epoch cut (drop_last) or wrapped round to this length
            order = order[:length] if drop_last else (order * 2)[:length]
            lists = [list(s) for s in shards]
            assert (
                {len(x) for x in lists} == {len(shards[0])} == {n // world if drop_last else -(-n // world)}
            )
            assert all(key[0] == epoch for x in lists for key in x)
            for g in range(-(-len(lists[0]) // batch)):  # the last, short batch too
                together = sorted(i for x in lists for _, i in x[g * batch : (g + 1) * batch])
                assert together == sorted(order[g * world * batch : (g + 1) * world * batch])
            seen = [i for x in lists for _, i in x]
            assert sorted(seen) == sorted(order)
            if not drop_last:  # every item, the first ones twice
                assert set(seen) == set(range(n))
    with pytest.raises(ValueError, match="rank 3"):
        ShardedEpochSampler(n, seed, 3, world)


def test_helpers_answer_as_one_process_outside_torchrun(tmp_path: Path) -> None:
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    sampler = sampler_for(7, 1)
    assert type(sampler) is EpochSampler and len(sampler) == 7
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    t = torch.ones(2)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.ones(2))
    assert not distributed.setup("cpu")  # no WORLD_SIZE: nothing to join
    with distributed.main_lock(tmp_path / "run") as folder:
        assert (folder / LOCK_FILE).is_file()


def test_setup_refuses_a_half_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        distributed.setup("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.process_device("cpu") == torch.device("cpu")
    # a machine with 2 GPUs, seen without one: each process takes the GPU of its local rank
    monkeypatch.setattr(distributed, "resolve_device", torch.device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.process_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"set train\.device to auto or cuda"):
        distributed.process_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="only 1 GPU"):
        distributed.process_device("cuda")


def test_sync_bn_keeps_frozen_layers_and_timm_activations() -> None:
    frozen = nn.BatchNorm2d(4)
    frozen.register_forward_pre_hook(_stay_in_eval)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), frozen, nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.SiLU))
    weight = model[2].weight
    converted = convert_sync_bn(model)
    assert converted is model and model[1] is frozen
    assert type(model[2]) is nn.SyncBatchNorm and model[2].weight is weight
    assert type(model[3]) is SyncBatchNormAct and isinstance(model[3].act, nn.SiLU)
    assert distributed.has_sync_bn(model)


def test_amp_is_fp16_on_a_gpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    # a T4 (compute 7.5): bf16 only through emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype(cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100, H100
    assert amp_dtype(cuda) == torch.bfloat16
    assert amp_dtype(torch.device("cpu")) is None and amp_dtype(cuda, enabled=False) is None


# --------------------------------------------------------------------------- recipes and profiles


def make_dry_run(*args: str) -> str:
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.mark.parametrize("stage", ["seg", "cls"])
def test_make_gpus_launches_torchrun(stage: str) -> None:
    module = f"-m stages.train_{stage} "
    launched = make_dry_run(f"train-{stage}", "GPUS=2", "FOLDS=0")
    assert f".venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 {module}" in launched
    assert "--folds 0" in launched
    plain = make_dry_run(f"train-{stage}")
    assert f".venv/bin/python {module}" in plain and "torch.distributed" not in plain


def test_t4x2_profiles_keep_their_full_configs_batch() -> None:
    """Each 2 x T4 profile: the effective batch (and so lr and schedule) of the full config it derives from."""
    import yaml

    from pipeline.datasets import load_config

    profiles = sorted((ROOT / "configs").glob("t4x2_*.yaml"))
    trained = [p for p in profiles if load_config(p).stage in ("seg", "cls")]
    assert len(trained) >= 4
    for path in trained:
        cfg, base = (
            load_config(path),
            load_config(ROOT / "configs" / yaml.safe_load(path.read_text())["base"]),
        )
        assert base.name.startswith("full_"), path.name
        mine, full = cfg.train, base.train
        assert mine.batch_size * 2 * mine.accum_steps == full.batch_size * full.accum_steps, path.name
        assert mine.batch_size <= full.batch_size // 2 and mine.amp, path.name
        assert mine.num_workers <= 2, path.name  # 2 processes on the notebook's 4 cores
        assert (mine.epochs, mine.lr, cfg.data) == (full.epochs, full.lr, base.data), path.name
        weights = cfg.model.pretrained_path
        assert weights is None or "/t4x2_" in weights, path.name  # a stage-2 profile starts from a t4x2 run
        assert dataclasses.replace(cfg.model, pretrained_path=base.model.pretrained_path) == base.model
    ensemble = load_config(ROOT / "configs" / "t4x2_ensemble.yaml")
    names = [m.config for m in ensemble.members] + [ensemble.classifier]
    assert all((ROOT / "configs" / f"{name}.yaml") in trained for name in names)
