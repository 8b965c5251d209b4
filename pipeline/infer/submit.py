"""``make submit``: every test day-volume through crop, gate, ensemble, post-processing and RLE.

One day at a time (the next day's PNGs are read while the current one is predicted): the crop
box from the body detector (members trained without crop see the full frame), the classifier's
per-slice organ probabilities (mean over its folds), the weighted mean of every member x fold
segmenter with TTA, the tuned post-processing of ``postprocess.json``, and run-length encoding
(on the GPU when there is one). The CSV has exactly the rows of ``sample_submission.csv`` in
its order; it is validated before it is renamed into place, so a failed run leaves any previous
file untouched.

Kaggle behaviours: an empty test folder (the public competition page) still gives a valid file,
and ``debug_train_days`` runs the same path over the first N train day-volumes instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import CLASSES, EnsembleConfig, TTACfg
from pipeline.data.catalog import DataError, days, scan_split
from pipeline.data.geometry import Box, full_box
from pipeline.data.volumes import Volume, read_volume
from pipeline.infer.ensemble import check_members, config_name
from pipeline.infer.postprocess import Decisions, DecisionsError, apply_postprocess, read_decisions, to_uint8
from pipeline.io import atomic_path
from pipeline.paths import run_dir

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ["id", "class", "predicted"]


class SubmissionError(ValueError):
    """The submission about to be written does not match the expected rows."""


@dataclass
class Member:
    """One loaded network: a segmenter fold (weight > 0) or a classifier fold."""

    name: str
    fold: int
    model: Any
    cfg: Any
    weight: float


def crop_key(member_cfg: Any, det_config: str | None) -> str | None:
    """The detector a member's crop comes from (the ensemble's ``det_config`` first); None = full frame."""
    if not member_cfg.data.crop:
        return None
    return det_config or member_cfg.data.det_config


class EnsemblePredictor:
    """Models loaded once; :meth:`masks` turns a day's image into its post-processed masks."""

    def __init__(self, cfg: EnsembleConfig, decisions: Decisions, device: Any = None):
        from pipeline.infer.predict import load_member
        from pipeline.train.engine import resolve_device

        self.device = resolve_device(str(device or cfg.device))
        self.amp = bool(cfg.amp) and self.device.type == "cuda"
        self.batch_size = cfg.batch_size
        self.tta: TTACfg = cfg.tta
        self.decisions = decisions
        self.det_config = cfg.det_config
        self.segmenters = [
            Member(m["config"], fold, *load_member(run_dir("seg", m["config"], fold), self.device), 0.0)
            for m in decisions.members
            if decisions.weights.get(m["config"], 0.0) > 0
            for fold in m["folds"]
        ]
        for member in self.segmenters:
            n_folds = sum(1 for s in self.segmenters if s.name == member.name)
            member.weight = decisions.weights[member.name] / n_folds
        gated = any(p.gate_threshold > 0 for p in decisions.params())
        self.classifiers = []
        if gated and decisions.classifier:
            name = decisions.classifier["config"]
            self.classifiers = [
                Member(name, fold, *load_member(run_dir("cls", name, fold), self.device), 1.0)
                for fold in decisions.classifier["folds"]
            ]
        keys = {crop_key(m.cfg, cfg.det_config) for m in self.segmenters + self.classifiers}
        self.detectors = {key: self._load_detector(key) for key in keys if key is not None}
        log.info(
            "ensemble: %d segmenters (%s), %d classifier folds, detectors %s, device %s, TTA %s",
            len(self.segmenters),
            ", ".join(f"{m.name}/fold_{m.fold} w={m.weight:.3f}" for m in self.segmenters),
            len(self.classifiers),
            sorted(self.detectors) or "none (full frame)",
            self.device,
            self.tta,
        )

    def _load_detector(self, name: str) -> Any:
        from pipeline.models.detector import BodyDetector

        return BodyDetector.load(run_dir("det", config_name(name, "det")), str(self.device))

    def boxes(self, image: np.ndarray) -> dict[str | None, Box]:
        """The day's crop box from every detector in use (None: the full frame)."""
        out: dict[str | None, Box] = {None: full_box(image.shape[1:])}
        for key, detector in self.detectors.items():
            out[key] = detector.day_box(image)[0]
        return out

    def gate_probs(self, image: np.ndarray, boxes: dict[str | None, Box]) -> np.ndarray | None:
        """(S, 3) classifier probabilities, the mean over its folds; None when no class is gated."""
        from pipeline.infer.predict import predict_day_cls

        if not self.classifiers:
            return None
        total = np.zeros((len(image), len(CLASSES)), dtype=np.float32)
        for m in self.classifiers:
            box = boxes[crop_key(m.cfg, self.det_config)]
            total += predict_day_cls(
                m.model,
                m.cfg,
                image,
                box,
                device=self.device,
                batch_size=self.batch_size,
                tta=self.tta,
                amp=self.amp,
            )
        return total / len(self.classifiers)

    def seg_probs(self, image: np.ndarray, boxes: dict[str | None, Box]) -> np.ndarray:
        """(S, 3, H, W) float32 weighted mean of every member x fold (TTA inside each)."""
        from pipeline.infer.predict import predict_day

        total = np.zeros((len(image), len(CLASSES), *image.shape[1:]), dtype=np.float32)
        for m in self.segmenters:
            box = boxes[crop_key(m.cfg, self.det_config)]
            probs = predict_day(
                m.model,
                m.cfg,
                image,
                box,
                device=self.device,
                batch_size=self.batch_size,
                tta=self.tta,
                amp=self.amp,
            )
            total += np.float32(m.weight) * probs
        return total

    def masks(self, image: np.ndarray) -> np.ndarray:
        """A day (S, H, W) uint16 -> post-processed (S, 3, H, W) bool masks."""
        boxes = self.boxes(image)
        gate = self.gate_probs(image, boxes)
        probs = to_uint8(self.seg_probs(image, boxes))
        return apply_postprocess(probs, gate, self.decisions.classes)

    def encode(self, masks: np.ndarray) -> list[str]:
        """RLE strings of (S, 3, H, W) masks, slice-major then class (the submission's row order)."""
        from pipeline.rle import encode_masks

        flat = masks.reshape(-1, *masks.shape[2:])
        if self.device.type == "cuda":
            import torch

            return encode_masks(torch.from_numpy(flat).to(self.device))
        return encode_masks(flat)


def check_decisions(cfg: EnsembleConfig, decisions: Decisions) -> None:
    """The decisions must have been tuned for this config's members and classifier."""
    wanted = sorted(config_name(m.config, "seg") for m in check_members(cfg))
    tuned = sorted(m["config"] for m in decisions.members)
    if wanted != tuned:
        raise DecisionsError(
            f"postprocess.json of '{cfg.name}' was tuned for members {tuned} but the config lists {wanted}; "
            f"rerun `make tune ENSEMBLE=configs/{cfg.name}.yaml`"
        )
    want_cls = config_name(cfg.classifier, "cls") if cfg.classifier else None
    have_cls = decisions.classifier["config"] if decisions.classifier else None
    if want_cls != have_cls:
        raise DecisionsError(
            f"postprocess.json of '{cfg.name}' was tuned with classifier {have_cls} but the config names {want_cls}; "
            f"rerun `make tune ENSEMBLE=configs/{cfg.name}.yaml`"
        )


# --------------------------------------------------------------------------- rows and days


def _rows_of(catalog: pd.DataFrame) -> pd.DataFrame:
    ids = np.repeat(catalog["id"].to_numpy(), len(CLASSES))
    return pd.DataFrame({"id": ids, "class": np.tile(CLASSES, len(catalog))})


def expected_rows(root: Path, debug_train_days: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows ``id, class`` the file must have in order, catalog of the slices to predict)."""
    root = Path(root)
    if debug_train_days > 0:
        train = scan_split(root, "train")
        if train.empty:
            raise DataError(f"debug_train_days={debug_train_days} but {root / 'train'} has no slice images")
        keep = days(train)[:debug_train_days]
        catalog = train[train["case_day"].isin(keep)].reset_index(drop=True)
        log.info(
            "debug: predicting %d train day-volumes (%d slices) instead of the test set",
            len(keep),
            len(catalog),
        )
        return _rows_of(catalog), catalog
    catalog = scan_split(root, "test")
    sample_path = root / "sample_submission.csv"
    if sample_path.is_file():
        sample = pd.read_csv(sample_path, dtype=str, keep_default_na=False)
        missing = {"id", "class"} - set(sample.columns)
        if missing:
            raise DataError(f"{sample_path}: missing columns {sorted(missing)} (expected id,class,predicted)")
        rows = sample[["id", "class"]].reset_index(drop=True)
    else:
        log.warning("%s not found: writing one row per test slice and class", sample_path)
        rows = _rows_of(catalog)
    no_image = sorted(set(rows["id"]) - set(catalog["id"])) if not catalog.empty else sorted(set(rows["id"]))
    if no_image and not catalog.empty:
        log.warning(
            "%d sample_submission ids have no test image (first %s): left empty", len(no_image), no_image[0]
        )
    catalog = catalog[catalog["id"].isin(set(rows["id"]))] if not catalog.empty else catalog
    return rows, catalog.reset_index(drop=True)


def _read_days(catalog: pd.DataFrame) -> Iterator[Volume]:
    """Day-volumes in catalog order, the next one read in the background."""
    groups = [g for _, g in catalog.groupby("case_day", sort=False)]
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_volume, groups[0], False) if groups else None
        for i in range(len(groups)):
            volume = pending.result()
            pending = reader.submit(read_volume, groups[i + 1], False) if i + 1 < len(groups) else None
            yield volume


def validate_rows(
    frame: pd.DataFrame, rows: pd.DataFrame, where: str, shapes: dict[str, tuple[int, int]] | None = None
) -> None:
    """The written file has the expected rows in order, then the metric's format and bounds checks."""
    from pipeline.metric import validate_submission

    if list(frame.columns) != SUBMISSION_COLUMNS:
        raise SubmissionError(f"{where}: columns {list(frame.columns)}, expected {SUBMISSION_COLUMNS}")
    if (
        len(frame) != len(rows)
        or not (frame[["id", "class"]].to_numpy() == rows[["id", "class"]].to_numpy()).all()
    ):
        raise SubmissionError(
            f"{where}: rows differ from the expected (id, class) rows of sample_submission.csv"
        )
    validate_submission(frame, rows.assign(segmentation=""), shapes)


def write_submission(
    frame: pd.DataFrame, rows: pd.DataFrame, out: Path, shapes: dict[str, tuple[int, int]] | None = None
) -> Path:
    """Write atomically: to a temporary file, read back and validated, then renamed over ``out``."""
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, columns=SUBMISSION_COLUMNS)
        written = pd.read_csv(tmp, dtype=str, keep_default_na=False)
        validate_rows(written, rows, str(out), shapes)
    return Path(out)


def run_submit(
    cfg: EnsembleConfig, data_root: Path, out: Path, *, debug_train_days: int = 0, device: Any = None
) -> Path:
    """Predict every test day-volume of ``data_root`` with the tuned ensemble; write ``out`` (CSV)."""
    decisions = read_decisions(cfg.name)
    check_decisions(cfg, decisions)
    rows, catalog = expected_rows(Path(data_root), debug_train_days or cfg.debug_train_days)
    predicted: dict[tuple[str, str], str] = {}
    start = time.perf_counter()
    if catalog.empty:
        log.warning("no test images under %s: writing the expected rows with empty predictions", data_root)
    else:
        predictor = EnsemblePredictor(cfg, decisions, device)
        n_days = catalog["case_day"].nunique()
        for volume in tqdm(_read_days(catalog), total=n_days, desc="submit", unit="day"):
            keys = [(slice_id, cls) for slice_id in volume.ids for cls in CLASSES]
            predicted.update(zip(keys, predictor.encode(predictor.masks(volume.image))))
    frame = rows.copy()
    frame["predicted"] = [predicted.get(key, "") for key in zip(rows["id"], rows["class"])]
    shapes = {i: (int(h), int(w)) for i, h, w in zip(catalog["id"], catalog["height"], catalog["width"])}
    write_submission(frame, rows, Path(out), shapes)
    n_pos = int((frame["predicted"] != "").sum())
    log.info(
        "wrote %s: %d rows (%d non-empty), %d day-volumes in %.1f s",
        out,
        len(frame),
        n_pos,
        catalog["case_day"].nunique() if not catalog.empty else 0,
        time.perf_counter() - start,
    )
    return Path(out)
