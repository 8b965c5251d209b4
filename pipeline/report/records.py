"""The run folders of an ensemble read back as records: what ``make status`` tabulates and the page draws.

Nothing here loads a model or decodes an image: a fold is its files (``best.pt``, ``last.pt``,
``metrics.csv``, ``config.yaml``, the OOF) and their times, so reading a whole ensemble takes well
under a second. The layout is the one of docs/ARCHITECTURE.md ("Trained members"); the OOF files a
fold must hold mirror the ``oof_files`` of the task records in :mod:`pipeline.train.tasks`
(``tests/test_status.py`` checks the two agree).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.config import EnsembleConfig, MemberConfig, config_from_text, resolve_config_path
from pipeline.errors import PipelineError
from pipeline.io import LOCK_FILE
from pipeline.paths import PROJECT_ROOT, run_dir

EXCLUDED_FOLD = -1  # folds.csv's fold of an excluded volume (pipeline.data.folds.EXCLUDED)
MONITOR = "score"  # the metric best.pt is chosen on (engine.fit's default monitor)


# --------------------------------------------------------------------------- folds.csv


@dataclass
class FoldsTable:
    """``$DATA_DIR/folds.csv``: per fold its validation volumes (the excluded ones apart)."""

    path: Path
    frame: pd.DataFrame

    @classmethod
    def read(cls, root: Path) -> FoldsTable | None:
        path = Path(root) / "folds.csv"
        if not path.is_file():
            return None
        return cls(path, pd.read_csv(path, dtype={"id": str, "volume_id": str, "group": str}))

    def folds(self) -> list[int]:
        return sorted(int(k) for k in set(self.frame["fold"]) if k != EXCLUDED_FOLD)

    def volumes_of(self, fold: int | str) -> list[str]:
        """The validation volumes of a fold (none for ``"all"``)."""
        if str(fold) == "all":
            return []
        rows = self.frame[self.frame["fold"] == int(fold)]
        return list(dict.fromkeys(rows["volume_id"]))

    def counts(self) -> dict[str, int]:
        usable = self.frame[self.frame["fold"] != EXCLUDED_FOLD]
        return {
            "images": len(self.frame),
            "volumes": self.frame["volume_id"].nunique(),
            "groups": self.frame["group"].nunique(),
            "folds": len(self.folds()),
            "excluded volumes": self.frame["volume_id"].nunique() - usable["volume_id"].nunique(),
        }


# --------------------------------------------------------------------------- one fold


def read_metrics(path: Path) -> pd.DataFrame | None:
    """A fold's ``metrics.csv`` (one row per finished epoch), None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError):
        return None
    return frame if "epoch" in frame.columns else None


def lock_owner(folder: Path) -> str | None:
    """ "pid N" of a live process on this host that holds the folder's run lock (None: nobody).

    Reads the text ``pipeline.io.run_lock`` writes and asks the kernel whether that process lives:
    taking the lock to test it could make a trainer starting at that moment fail.
    """
    try:
        text = (folder / LOCK_FILE).read_text()
    except OSError:
        return None
    parts = text.split()
    if len(parts) < 4 or parts[0] != "pid" or parts[2] != "on" or parts[3] != socket.gethostname():
        return None
    try:
        os.kill(int(parts[1]), 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"pid {parts[1]}"


@dataclass
class FoldRun:
    """One fold of a trained member (or the detector run), as its files say."""

    fold: str  # "0", "1", ... or "all"; "" for a run without folds (the detector)
    dir: Path
    metrics: pd.DataFrame | None
    epochs_planned: int | None
    oof_expected: list[Path] = field(default_factory=list)
    running: str | None = None

    @property
    def has_best(self) -> bool:
        return (self.dir / "best.pt").is_file()

    @property
    def has_last(self) -> bool:
        return (self.dir / "last.pt").is_file()

    @property
    def epochs_done(self) -> int:
        if self.metrics is None or self.metrics.empty:
            return 0
        return int(self.metrics["epoch"].max())

    @property
    def oof_written(self) -> int:
        return sum(p.is_file() for p in self.oof_expected)

    @property
    def oof_complete(self) -> bool:
        return bool(self.oof_expected) and self.oof_written == len(self.oof_expected)

    def best(self) -> tuple[int | None, float | None]:
        """(best epoch, its validation score): the highest finite ``score``; the last epoch without one."""
        if self.metrics is None or self.metrics.empty:
            return None, None
        if MONITOR in self.metrics.columns:
            scores = pd.to_numeric(self.metrics[MONITOR], errors="coerce")
            if scores.notna().any():
                i = scores.idxmax()
                return int(self.metrics.loc[i, "epoch"]), float(scores[i])
        return int(self.metrics["epoch"].iloc[-1]), None

    @property
    def finished(self) -> bool:
        return self.has_best and self.epochs_planned is not None and self.epochs_done >= self.epochs_planned

    @property
    def state(self) -> str:
        """trained | training | stopped | not started (a stopped fold resumes from last.pt)."""
        if self.running:
            return "training"
        if self.finished and (self.oof_complete or not self.oof_expected):
            return "trained"
        if self.has_last or self.epochs_done:
            return "stopped"
        return "not started"

    def oof_mtime(self) -> float | None:
        times = [p.stat().st_mtime for p in self.oof_expected if p.is_file()]
        return max(times) if times else None


# --------------------------------------------------------------------------- a member


@dataclass
class MemberRuns:
    """A trained config (segmenter, classifier) over its planned folds."""

    name: str
    stage: str  # seg | cls
    config: Any | None  # the resolved config: a run folder's config.yaml, else the file in configs/
    config_file: Path | None  # configs/<name>.yaml where there is one
    planned: list[str]
    folds: dict[str, FoldRun]
    config_changed: bool = False  # the file in configs/ differs from what the runs were trained with

    @property
    def folds_trained(self) -> int:
        return sum(self.folds[f].state == "trained" for f in self.planned if f in self.folds)

    @property
    def complete(self) -> bool:
        return bool(self.planned) and self.folds_trained == len(self.planned)

    def missing_folds(self) -> list[str]:
        return [f for f in self.planned if self.folds[f].state != "trained"]

    def oof_mtime(self) -> float | None:
        times = [t for f in self.folds.values() if (t := f.oof_mtime()) is not None]
        return max(times) if times else None

    def best_mtime(self) -> float | None:
        times = [(f.dir / "best.pt").stat().st_mtime for f in self.folds.values() if f.has_best]
        return max(times) if times else None


def oof_files(stage: str, folder: Path, volumes: list[str]) -> list[Path]:
    """The OOF files a trained fold holds (pipeline.train.tasks: ``oof/<volume>.npz`` or ``oof.csv``)."""
    if not volumes:
        return []
    if stage == "cls":
        return [folder / "oof.csv"]
    return [folder / "oof" / f"{v}.npz" for v in volumes]


def read_run_config(folder: Path, stage: str) -> Any | None:
    """The resolved config a run folder was written with (None when absent or not valid any more)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    try:
        return config_from_text(path.read_text(), str(path), stage)
    except PipelineError:
        return None


def config_file(name: str) -> Path | None:
    try:
        return resolve_config_path(name)
    except PipelineError:
        return None


def load_member_config(name: str, stage: str) -> Any | None:
    """The config in ``configs/`` with the dataset's defaults, as a stage loads it (None: none there)."""
    from pipeline.datasets import load_config

    path = config_file(name)
    if path is None:
        return None
    try:
        return load_config(path, stage=stage)
    except PipelineError:
        return None


def read_member(name: str, stage: str, folds: FoldsTable | None, only: tuple[int, ...] | None) -> MemberRuns:
    """A member's planned folds (folds.csv, or the member's own list) and what each holds."""
    base = run_dir(stage, name)
    found = (
        sorted(p.name.removeprefix("fold_") for p in base.glob("fold_*") if p.is_dir())
        if base.is_dir()
        else []
    )
    planned = [str(k) for k in (folds.folds() if folds else []) if only is None or k in only]
    if only is not None and not folds:
        planned = [str(k) for k in only]
    from_file = load_member_config(name, stage)
    saved = next(
        (c for f in found if (c := read_run_config(run_dir(stage, name, f), stage)) is not None), None
    )
    runs = {}
    for fold in dict.fromkeys(planned + found):
        folder = run_dir(stage, name, fold)
        cfg = read_run_config(folder, stage) or saved or from_file
        volumes = folds.volumes_of(fold) if folds else []
        runs[fold] = FoldRun(
            fold,
            folder,
            read_metrics(folder / "metrics.csv"),
            None if cfg is None else int(cfg.train.epochs),
            oof_files(stage, folder, volumes),
            lock_owner(folder),
        )
    changed = saved is not None and from_file is not None and _trained_part(saved) != _trained_part(from_file)
    return MemberRuns(name, stage, saved or from_file, config_file(name), planned, runs, changed)


def _trained_part(cfg: MemberConfig) -> MemberConfig:
    """What the file and the run folder are compared on: the config less its name (a copied config trains
    the same) and ``model.pretrained_path`` (a fold's run holds it with ``{fold}`` filled in)."""
    from dataclasses import replace

    return replace(cfg, name="", model=replace(cfg.model, pretrained_path=None))


# --------------------------------------------------------------------------- the ensemble


@dataclass
class DetectorRun:
    name: str
    dir: Path
    metrics: dict[str, Any]  # metrics.json
    config_file: Path | None

    @property
    def trained(self) -> bool:
        return (self.dir / "weights.pt").is_file()


def read_detector(name: str) -> DetectorRun:
    folder = run_dir("det", name)
    path = folder / "metrics.json"
    try:
        metrics = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (yaml.YAMLError, OSError):
        metrics = {}
    return DetectorRun(name, folder, metrics or {}, config_file(name))


@dataclass
class EnsembleRuns:
    """Every run an ensemble config needs: detector, classifier, members; and its own files."""

    cfg: EnsembleConfig
    folds: FoldsTable | None
    detector: DetectorRun | None
    classifier: MemberRuns | None
    members: list[MemberRuns]

    @property
    def dir(self) -> Path:
        return run_dir("ensemble", self.cfg.name)

    @property
    def postprocess(self) -> Path:
        return self.dir / "postprocess.json"

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def trained(self) -> list[MemberRuns]:
        return [m for m in [self.classifier, *self.members] if m is not None]


def detector_name(cfg: EnsembleConfig, members: list[MemberRuns]) -> str | None:
    """The detector run whose boxes the ensemble crops with: its own ``det_config``, else a member's."""
    if cfg.det_config:
        return Path(cfg.det_config).stem
    for m in members:
        data = getattr(m.config, "data", None)
        if data is not None and data.crop:
            return data.det_config
    return None


def read_ensemble(cfg: EnsembleConfig, root: Path) -> EnsembleRuns:
    """The ensemble's runs as records (cheap: file listings, small CSV and YAML files)."""
    folds = FoldsTable.read(root)
    members = [read_member(Path(m.config).stem, "seg", folds, m.folds) for m in cfg.members]
    classifier = read_member(Path(cfg.classifier).stem, "cls", folds, None) if cfg.classifier else None
    det = detector_name(cfg, members)
    return EnsembleRuns(cfg, folds, read_detector(det) if det else None, classifier, members)


def mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def relative(path: Path | None) -> str:
    """A path as the user typed it: relative to the project where it is inside, else absolute."""
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
