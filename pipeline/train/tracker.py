"""The optional experiment tracker (``train.tracker: mlflow``), behind this one adapter: the only module
that imports mlflow.

Why MLflow: its records are what a fold already has (params = the resolved config, one metric per
``metrics.csv`` column per epoch, files as artifacts), it keeps them in a local store with no server
and no account, it reads them back offline through its own client (``MlflowClient().get_metric_history``,
which the tests use), and the same code logs to a team's tracking server when ``train.tracker_uri``
names one. (W&B's offline runs cannot be read back without syncing to its service; TensorBoard keeps
scalars but has no place for params or artifacts.)

- Off by default (``train.tracker: none``): nothing is imported, nothing written.
- Local by default: ``sqlite:///$RUNS_DIR/mlflow.db`` (MLflow's default backend since 3.7), artifacts
  under ``$RUNS_DIR/mlartifacts/``; ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows
  them. No network call is made unless ``train.tracker_uri`` names a server; telemetry is off
  (its switch is one of :data:`pipeline.runtime.OFFLINE_ENV`).
- One MLflow run per fold, in the experiment ``<stage>/<config name>``, tagged with its run folder:
  a resumed fold goes on logging into the same run; a fold started over gets a new one.
- Rank 0 only under DDP (the engine opens it on the main process alone). Parallel folds share the
  local store: its creation and the experiment's are serialised by a file lock.
- A fold killed mid-training leaves its run RUNNING until it is resumed and finishes.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import TrainCfg
from pipeline.paths import runs_dir
from pipeline.runtime import OFFLINE_ENV

log = logging.getLogger(__name__)

RUN_DIR_TAG = "pipeline.run_dir"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
MAX_PARAM = 6000  # MLflow's limit on one param value
BATCH = 100  # params per log_batch call (MLflow's limit)


class NoTracker:
    """``train.tracker: none`` (and every process but rank 0): does nothing."""

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        pass

    def finish(self, out_dir: Path) -> None:
        pass


def local_uri() -> str:
    return f"sqlite:///{(runs_dir() / LOCAL_DB).resolve()}"


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise creating the local store and its experiments across processes (parallel folds)."""
    if uri != local_uri():
        yield
        return
    runs_dir().mkdir(parents=True, exist_ok=True)
    with open(runs_dir() / f"{LOCAL_DB}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _client(cfg: TrainCfg) -> tuple[Any, str]:
    """An MlflowClient for the configured store (the local one when ``tracker_uri`` is null)."""
    for key, value in OFFLINE_ENV.items():  # mlflow reads its telemetry switch there, even outside a stage
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    uri = cfg.tracker_uri or local_uri()
    return MlflowClient(tracking_uri=uri), uri


def _experiment(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    where = None if uri != local_uri() else (runs_dir() / LOCAL_ARTIFACTS).resolve().as_uri() + "/" + name
    try:
        return client.create_experiment(name, artifact_location=where)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", ...}, each value cut to MLflow's length."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(data)[:MAX_PARAM]}


def experiment_name(config: dict[str, Any], out_dir: Path) -> str:
    """``<stage>/<config name>`` of a fold's resolved config (its run folder's parent name without one)."""
    return f"{config.get('stage', 'train')}/{config.get('name') or Path(out_dir).parent.name}"


def find_run(client: Any, experiment_id: str, out_dir: Path) -> Any | None:
    """The newest run of ``experiment_id`` tagged with this run folder (None: none)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_DIR_TAG}` = '{Path(out_dir).resolve()}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


class MLflowTracker:
    """One fold's MLflow run: params at the start, a metric batch per epoch, artifacts at the end."""

    def __init__(self, cfg: TrainCfg, out_dir: Path, config_text: str | None, resumed: bool) -> None:
        from mlflow.entities import Param, RunTag

        self.out_dir = Path(out_dir)
        config = yaml.safe_load(config_text or "") or {}
        name = experiment_name(config, self.out_dir)
        uri = cfg.tracker_uri or local_uri()
        with _store_lock(uri):  # the first client of a new local store creates its tables
            self.client, _ = _client(cfg)
            experiment = _experiment(self.client, name, uri)
        previous = find_run(self.client, experiment, self.out_dir) if resumed else None
        if previous is not None:
            self.run_id = previous.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_DIR_TAG: str(self.out_dir.resolve()), "dataset": str(config.get("dataset", ""))}
            run = self.client.create_run(experiment, tags=tags, run_name=self.out_dir.name)
            self.run_id = run.info.run_id
            params = [Param(k, v) for k, v in _flatten(config).items()]
            for i in range(0, len(params), BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + BATCH])
            self.client.log_batch(self.run_id, tags=[RunTag("mlflow.runName", self.out_dir.name)])
        log.info("tracking %s in MLflow experiment '%s' (run %s, %s)", self.out_dir, name, self.run_id, uri)

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, epoch)
            for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, out_dir: Path) -> None:
        for name in ("metrics.csv", "config.yaml"):
            if (Path(out_dir) / name).is_file():
                self.client.log_artifact(self.run_id, str(Path(out_dir) / name))
        self.client.set_terminated(self.run_id, "FINISHED")


def start_tracker(
    cfg: TrainCfg, out_dir: Path, config_text: str | None, resumed: bool
) -> NoTracker | MLflowTracker:
    """The tracker ``cfg.tracker`` names, open on this fold's run (called on rank 0 only)."""
    if cfg.tracker == "none":
        return NoTracker()
    return MLflowTracker(cfg, out_dir, config_text, resumed)


def attach(cfg: TrainCfg, out_dir: Path, files: list[Path]) -> bool:
    """Add ``files`` (the ensemble's report page) to the tracker run of a fold; False where it has none."""
    if cfg.tracker == "none":
        return False
    client, _ = _client(cfg)
    path = Path(out_dir) / "config.yaml"
    config = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    experiment = client.get_experiment_by_name(experiment_name(config, Path(out_dir)))
    run = None if experiment is None else find_run(client, experiment.experiment_id, out_dir)
    if run is None:
        return False
    for path in files:
        client.log_artifact(run.info.run_id, str(path), artifact_path="report")
    return True
