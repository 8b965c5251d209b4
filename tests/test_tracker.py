"""The optional MLflow tracker: a 1-epoch training with it on, read back through MLflow's own client,
offline; a resumed fold logging into the same run; off by default; rank 0 only; checked at load."""

from __future__ import annotations

import dataclasses
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.config import ConfigError, SegConfig, TrainCfg, dump_config, load_config
from pipeline.train import engine, tracker
from pipeline.train.engine import fit
from pipeline.train.losses import build_loss

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")
mlflow = pytest.importorskip("mlflow", reason="requirements-tracker.txt not installed")
from mlflow.tracking import MlflowClient  # noqa: E402

CFG = TrainCfg(epochs=1, batch_size=4, lr=1e-2, warmup_epochs=0.0, device="cpu", seed=1, tracker="mlflow")


class Batches(torch.utils.data.Dataset):
    """Random images and 0/1 targets as the engine's batch dicts."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, 8, 8, generator=g)
        self.y = (torch.rand(n, 3, 8, 8, generator=g) > 0.5).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "target": self.y[i]}


def score(model: nn.Module, epoch: int) -> dict[str, float]:
    return {"score": 0.5 + 0.1 * epoch}


def _fit(out: Path, cfg: TrainCfg = CFG, validate=score, **kwargs) -> engine.FitResult:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    text = dump_config(SegConfig(name="tiny", train=cfg))
    loader = DataLoader(Batches(), batch_size=cfg.batch_size)
    return fit(
        model,
        loader,
        build_loss(SegConfig().loss, "multilabel"),
        cfg,
        out,
        validate=validate,
        config_text=text,
        **kwargs,
    )


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local store with MLflow's tables created once (its migrations take seconds), copied per test."""
    path = tmp_path_factory.mktemp("mlflow") / tracker.LOCAL_DB
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(isolated_dirs: Path, empty_store: Path) -> Path:
    runs = isolated_dirs / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, runs / tracker.LOCAL_DB)
    return runs / tracker.LOCAL_DB


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Any TCP/UDP connection attempt fails the test (unix sockets stay allowed)."""
    tried: list[tuple] = []
    original = socket.socket.connect

    def connect(self: socket.socket, address) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            tried.append(address)
            raise OSError(f"network call to {address} during a tracker test")
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return tried


def test_one_epoch_logged_and_read_back_offline(isolated_dirs: Path, store: Path, no_network: list) -> None:
    out = isolated_dirs / "runs" / "seg" / "tiny" / "fold_0"
    _fit(out)
    client = MlflowClient(tracking_uri=tracker.local_uri())
    experiment = client.get_experiment_by_name("seg/tiny")
    run = tracker.find_run(client, experiment.experiment_id, out)
    assert run is not None and run.info.status == "FINISHED" and run.info.run_name == "fold_0"
    metrics = pd.read_csv(out / "metrics.csv")
    for key in ("train_loss", "lr", "images_per_s", "score"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(1, pytest.approx(metrics[key].iloc[0]))], key
    params = run.data.params
    assert params["train.tracker"] == "mlflow" and params["train.lr"] == "0.01" and params["name"] == "tiny"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.csv", "config.yaml"}
    assert not no_network


def test_resumed_fold_logs_into_the_same_run_and_report_attaches(
    isolated_dirs: Path, store: Path, no_network: list
) -> None:
    out = isolated_dirs / "runs" / "seg" / "tiny" / "fold_1"
    _fit(out)
    _fit(out, dataclasses.replace(CFG, epochs=2))  # resumes from last.pt
    client = MlflowClient(tracking_uri=tracker.local_uri())
    experiment = client.get_experiment_by_name("seg/tiny")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    run = tracker.find_run(client, experiment.experiment_id, out)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [1, 2]
    page = isolated_dirs / "index.html"
    page.write_text("<html></html>")
    assert tracker.attach(CFG, out, [page])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/index.html"]
    assert not no_network


def test_off_by_default_and_on_rank_zero_only(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert TrainCfg().tracker == "none"
    _fit(isolated_dirs / "runs" / "seg" / "tiny" / "fold_0", dataclasses.replace(CFG, tracker="none"))
    assert not (isolated_dirs / "runs" / "mlflow.db").exists()
    opened = []
    monkeypatch.setattr(engine, "start_tracker", lambda *a: opened.append(a) or tracker.NoTracker())
    monkeypatch.setattr(engine.distributed, "is_main", lambda: False)  # another rank than 0
    _fit(isolated_dirs / "rank1", validate=None)  # rank 0 alone validates
    assert opened == [] and not (isolated_dirs / "runs" / "mlflow.db").exists()


def test_tracker_is_checked_when_the_config_loads() -> None:
    with pytest.raises(ConfigError, match=r"'train.tracker' = 'wandb' must be one of none, mlflow"):
        load_config("demo_seg", ["train.tracker=wandb"])
    with pytest.raises(ConfigError, match=r"train\.tracker is none"):
        load_config("demo_seg", ["train.tracker_uri=http://127.0.0.1:5000"])
    assert load_config("demo_seg", ["train.tracker=mlflow"]).train.tracker_uri is None
