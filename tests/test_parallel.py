"""Folds side by side (pipeline.train.parallel): order, processes, core sharing, failures, and
`make train-seg --jobs 2` end to end against `--jobs 1`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import runtime
from pipeline.train.parallel import resolve_jobs, run_folds


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
