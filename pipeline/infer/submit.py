"""``make submit``: every test volume through crop, gate, ensemble, post-processing and the writer.

One volume at a time (the next one's files are read while the current one is predicted): the crop
box from the body detector (members trained without crop see the full frame), the classifier's
per-slice class probabilities (mean over its folds), the weighted mean of every member x fold
segmenter with TTA (one weight per class and member, split evenly over the member's folds; a member
with weight 0 in every class is not loaded), the tuned post-processing of ``postprocess.json``
(pixel threshold, classifier gate, probability gate, z-continuity, small components), and run-length encoding
(on the GPU when there is one). The dataset's writer (:meth:`DatasetSpec.submission_writer`) puts
the masks in the competition's format and checks the file before it is renamed into place, so a
failed run leaves any previous file untouched.

Kaggle behaviours: an empty test folder (the public competition page) still gives a valid file,
and ``debug_train_volumes`` runs the same path over the first N train volumes instead.

Every member's settings (input geometry, crop, detector) come from the resolved ``config.yaml`` of
its run folder (:func:`~pipeline.infer.predict.load_member`), never from ``configs/``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.config import ClsConfig, DataCfg, EnsembleConfig, SegConfig, TTACfg
from pipeline.data.geometry import Box, full_box
from pipeline.data.volumes import Volume
from pipeline.datasets.base import DatasetSpec
from pipeline.device import resolve_device
from pipeline.infer.ensemble import check_members, run_name
from pipeline.infer.masks import to_uint8
from pipeline.infer.postprocess import Decisions, DecisionsError, apply_postprocess, read_decisions
from pipeline.infer.predict import load_member
from pipeline.models.detector_boxes import BodyDetector
from pipeline.models.predict import predict_volume
from pipeline.paths import run_dir
from pipeline.rle import encode_masks

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One loaded network: a segmenter fold (weight > 0 in some class) or a classifier fold."""

    name: str
    fold: int
    model: torch.nn.Module
    cfg: SegConfig | ClsConfig  # the resolved config.yaml of its run
    weight: np.ndarray  # segmenter: (classes,) blend weight / its number of folds; classifier: 1 (unused)


def crop_key(data: DataCfg, det_config: str | None) -> str | None:
    """The detector a member's crop comes from (the ensemble's ``det_config`` first); None = full frame."""
    if not data.crop:
        return None
    return det_config or data.det_config


class EnsemblePredictor:
    """Models loaded once; :meth:`masks` turns a volume's image into its post-processed masks."""

    def __init__(
        self,
        cfg: EnsembleConfig,
        spec: DatasetSpec,
        decisions: Decisions,
        device: str | torch.device | None = None,
    ):
        self.spec = spec
        self.device = resolve_device(str(device or cfg.device))
        self.amp = bool(cfg.amp) and self.device.type == "cuda"
        self.batch_size = cfg.batch_size
        self.tta: TTACfg = cfg.tta
        self.decisions = decisions
        self.det_config = cfg.det_config
        names = [m["config"] for m in decisions.members]
        weights = decisions.weight_matrix(names)  # (classes, members), each class summing to 1
        used = set(decisions.used_members())  # a member with weight 0 in every class is not loaded
        self.segmenters = [
            Member(
                m["config"],
                fold,
                *load_member(run_dir("seg", m["config"], fold), self.device),
                (weights[:, j] / len(m["folds"])).astype(np.float32),
            )
            for j, m in enumerate(decisions.members)
            if m["config"] in used
            for fold in m["folds"]
        ]
        self.classifiers: list[Member] = []
        if decisions.needs_classifier() and decisions.classifier:
            name = decisions.classifier["config"]
            self.classifiers = [
                Member(name, fold, *load_member(run_dir("cls", name, fold), self.device), np.ones(1))
                for fold in decisions.classifier["folds"]
            ]
        keys = {crop_key(m.cfg.data, cfg.det_config) for m in self.segmenters + self.classifiers}
        self.detectors = {key: self._load_detector(key) for key in keys if key is not None}
        log.info(
            "ensemble: %d segmenters (%s), %d classifier folds, detectors %s, device %s, TTA %s",
            len(self.segmenters),
            ", ".join(f"{m.name}/fold_{m.fold} w={np.round(m.weight, 3).tolist()}" for m in self.segmenters),
            len(self.classifiers),
            sorted(self.detectors) or "none (full frame)",
            self.device,
            self.tta,
        )

    def _load_detector(self, name: str) -> BodyDetector:
        return BodyDetector.load(run_dir("det", run_name(name)), str(self.device))

    def boxes(self, image: np.ndarray) -> dict[str | None, Box]:
        """The volume's crop box from every detector in use (None: the full frame)."""
        out: dict[str | None, Box] = {None: full_box(image.shape[-2:])}
        for key, detector in self.detectors.items():
            out[key] = detector.volume_box(image)[0]
        return out

    def gate_probs(self, image: np.ndarray, boxes: dict[str | None, Box]) -> np.ndarray | None:
        """(S, classes) classifier probabilities, the mean over its folds; None when no class is gated."""
        if not self.classifiers:
            return None
        total = np.zeros((len(image), len(self.spec.classes)), dtype=np.float32)
        for m in self.classifiers:
            total += self._forward(predict_volume, m, image, boxes)
        return total / len(self.classifiers)

    def seg_probs(self, image: np.ndarray, boxes: dict[str | None, Box]) -> np.ndarray:
        """(S, classes, H, W) float32 weighted mean of every member x fold (TTA inside each), per class."""
        total = np.zeros((len(image), len(self.spec.classes), *image.shape[-2:]), dtype=np.float32)
        for m in self.segmenters:
            total += m.weight[None, :, None, None] * self._forward(predict_volume, m, image, boxes)
        return total

    def _forward(
        self, predict: Callable[..., np.ndarray], m: Member, image: np.ndarray, boxes: dict[str | None, Box]
    ) -> np.ndarray:
        """One network over a volume, in its own crop (TTA inside): segmenter or classifier probabilities."""
        box = boxes[crop_key(m.cfg.data, self.det_config)]
        return predict(
            m.model,
            m.cfg,
            image,
            box,
            device=self.device,
            batch_size=self.batch_size,
            tta=self.tta,
            amp=self.amp,
        )

    def masks(self, image: np.ndarray) -> np.ndarray:
        """A volume (S, [C,] H, W) -> post-processed (S, classes, H, W) bool masks."""
        boxes = self.boxes(image)
        gate = self.gate_probs(image, boxes)
        probs = to_uint8(self.seg_probs(image, boxes))
        return apply_postprocess(probs, gate, self.decisions.classes, self.spec.volumetric)

    def encode(self, masks: np.ndarray, order: str = "C") -> list[str]:
        """RLE strings of (N, H, W) masks in ``order`` (on the GPU when the predictor runs there)."""
        if self.device.type == "cuda":
            return encode_masks(torch.from_numpy(np.ascontiguousarray(masks)).to(self.device), order)
        return encode_masks(masks, order)


def check_decisions(cfg: EnsembleConfig, decisions: Decisions) -> None:
    """The decisions must have been tuned for this config's dataset, members and classifier."""
    if decisions.dataset != cfg.dataset:
        raise DecisionsError(
            f"postprocess.json of '{cfg.name}' was tuned on dataset '{decisions.dataset}' but the config is for "
            f"'{cfg.dataset}'; rerun `make tune ENSEMBLE=configs/{cfg.name}.yaml`"
        )
    wanted = sorted(run_name(m.config) for m in check_members(cfg))
    tuned = sorted(m["config"] for m in decisions.members)
    if wanted != tuned:
        raise DecisionsError(
            f"postprocess.json of '{cfg.name}' was tuned for members {tuned} but the config lists {wanted}; "
            f"rerun `make tune ENSEMBLE=configs/{cfg.name}.yaml`"
        )
    want_cls = run_name(cfg.classifier) if cfg.classifier else None
    have_cls = decisions.classifier["config"] if decisions.classifier else None
    if want_cls != have_cls:
        raise DecisionsError(
            f"postprocess.json of '{cfg.name}' was tuned with classifier {have_cls} but the config names {want_cls}; "
            f"rerun `make tune ENSEMBLE=configs/{cfg.name}.yaml`"
        )


# --------------------------------------------------------------------------- volumes


def read_volumes(spec: DatasetSpec, catalog: pd.DataFrame) -> Iterator[Volume]:
    """Volumes in catalog order, the next one read in the background."""
    groups = [g for _, g in catalog.groupby("volume_id", sort=False)]
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = [reader.submit(spec.read_volume, g, False) for g in groups[:1]]
        for i in range(len(groups)):
            volume = pending.pop().result()
            pending += [reader.submit(spec.read_volume, g, False) for g in groups[i + 1 : i + 2]]
            yield volume


def run_submit(
    cfg: EnsembleConfig,
    spec: DatasetSpec,
    data_root: Path,
    out: Path,
    *,
    debug_train_volumes: int = 0,
    device: str | torch.device | None = None,
    force: bool = False,
) -> Path:
    """Predict every test volume of ``data_root`` with the tuned ensemble; write ``out`` (and what the dataset adds).

    ``force`` writes a submission the dataset's sanity checks refuse (e.g. every nerve mask identical).
    """
    decisions = read_decisions(cfg.name)
    check_decisions(cfg, decisions)
    catalog = spec.prediction_catalog(Path(data_root), debug_train_volumes or cfg.debug_train_volumes)
    start = time.perf_counter()
    if catalog.empty:
        log.warning("no test images under %s: writing the expected rows with empty predictions", data_root)
        writer = spec.submission_writer(Path(data_root), Path(out), catalog, encode_masks, force)
    else:
        predictor = EnsemblePredictor(cfg, spec, decisions, device)
        writer = spec.submission_writer(Path(data_root), Path(out), catalog, predictor.encode, force)
        n_volumes = catalog["volume_id"].nunique()
        for volume in tqdm(read_volumes(spec, catalog), total=n_volumes, desc="submit", unit="vol"):
            writer.add(volume, predictor.masks(volume.image))
    path = writer.finish()
    log.info(
        "wrote %s: %d images of %d volumes in %.1f s",
        path,
        len(catalog),
        catalog["volume_id"].nunique() if not catalog.empty else 0,
        time.perf_counter() - start,
    )
    return path
