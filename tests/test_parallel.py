"""Folds side by side (pipeline.train.parallel): order, processes, core sharing, failures, the
GPU each worker is pinned to, and the job count under torchrun."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import runtime
from pipeline.train.parallel import gpu_for_worker, resolve_jobs, run_folds, visible_gpus


def _fake_train(cfg: SimpleNamespace, fold: int, progress: bool = True) -> Path:
    """Module-level (the workers import it by name): records where and how it ran."""
    threads = runtime.balance_threads()
    shared = runtime._shared.get("running")
    out = Path(cfg.out) / f"fold_{fold}.json"
    record = {
        "pid": os.getpid(),
        "threads": threads,
        "running": None if shared is None else shared.value,
        "progress": progress,
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    out.write_text(json.dumps(record))
    if fold == cfg.fail:
        raise ValueError(f"planted failure in fold {fold}")
    return out


def _cfg(tmp_path: Path, fail: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(name="fake", out=str(tmp_path), fail=fail)


def test_resolve_jobs() -> None:
    assert resolve_jobs("3", 2) == 2  # never more than the folds
    assert resolve_jobs(1, 5) == 1
    assert 1 <= resolve_jobs("auto", 5) <= 5
    assert resolve_jobs("auto", 1) == 1
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="--jobs"):
            resolve_jobs(bad, 5)


def test_one_job_runs_in_this_process(tmp_path: Path) -> None:
    outs = run_folds(_fake_train, _cfg(tmp_path), [2, 0], jobs=1)
    assert [p.name for p in outs] == ["fold_2.json", "fold_0.json"]
    records = [json.loads(p.read_text()) for p in outs]
    assert {r["pid"] for r in records} == {os.getpid()}
    assert all(r["running"] is None and r["progress"] for r in records)


def test_folds_side_by_side_share_the_cores(tmp_path: Path) -> None:
    outs = run_folds(_fake_train, _cfg(tmp_path), [3, 1, 2], jobs=2)
    assert [p.name for p in outs] == ["fold_3.json", "fold_1.json", "fold_2.json"]  # folds order
    records = [json.loads(p.read_text()) for p in outs]
    assert os.getpid() not in {r["pid"] for r in records}
    cores = runtime.available_cores()
    for r in records:
        assert not r["progress"]  # no per-batch bars from several processes at once
        assert 1 <= r["running"] <= 2
        assert r["threads"] in {max(1, cores // n) for n in (1, 2)}
        assert r["gpu"] == os.environ.get("CUDA_VISIBLE_DEVICES")  # no GPU here: nothing pinned


def test_failing_fold_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="fake fold 1 failed: planted failure in fold 1"):
        run_folds(_fake_train, _cfg(tmp_path, fail=1), [0, 1], jobs=2)


def test_balance_threads_follows_running_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    running = SimpleNamespace(value=2)
    monkeypatch.setattr(runtime, "_shared", {})
    try:
        assert runtime.balance_threads() == before  # outside a worker: untouched
        runtime.share_cores(running, 4)
        assert runtime.balance_threads() == 2
        running.value = 1  # the other fold finished
        assert runtime.balance_threads() == 4
        running.value = 8
        assert runtime.balance_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_workers_take_the_gpus_round_robin() -> None:
    assert [gpu_for_worker(slot, ["0", "1"]) for slot in range(5)] == ["0", "1", "0", "1", "0"]
    assert gpu_for_worker(3, ["GPU-a1"]) == "GPU-a1"
    assert gpu_for_worker(0, []) is None


def test_each_worker_is_pinned_to_its_own_gpu(tmp_path: Path) -> None:
    outs = run_folds(_fake_train, _cfg(tmp_path), [0, 1, 2], jobs=2, gpus=["3", "5"])
    records = [json.loads(p.read_text()) for p in outs]
    by_worker: dict[int, set[str]] = {}
    for r in records:
        by_worker.setdefault(r["pid"], set()).add(r["gpu"])
    assert all(len(gpus) == 1 for gpus in by_worker.values())  # a worker keeps its GPU
    pinned = [gpus.pop() for gpus in by_worker.values()]
    assert set(pinned) <= {"3", "5"} and len(set(pinned)) == len(pinned)  # and no two share one


def test_auto_jobs_is_one_fold_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1"]
    assert (resolve_jobs("auto", 5), resolve_jobs("auto", 1)) == (2, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a1, 7,2")
    assert visible_gpus() == ["GPU-a1", "7"]  # the first device_count() entries
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_jobs("auto", 5) == 1  # one GPU: the folds queue for it in one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []


def test_torchrun_trains_one_fold_at_a_time() -> None:
    assert resolve_jobs("auto", 5, processes=2) == resolve_jobs("1", 5, processes=2) == 1
    with pytest.raises(ValueError, match="GPUS=1 with JOBS>1"):
        resolve_jobs("2", 5, processes=2)
