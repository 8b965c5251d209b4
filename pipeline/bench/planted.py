"""Planted predictions: what trained networks would hand the data side, made from the truth masks.

``make bench-scale`` times every stage after training without any network. A member's
probabilities are its truth masks moved by a sub-pixel shift, blurred at the edges, scaled
below 1, with some organ slices missed and a few false-positive blobs (so thresholds, the gate
and the minimum component size all have something to decide); two members differ in every one
of these. The classifier's slice probabilities overlap between present and absent classes.
Everything is seeded from the volume id, so the out-of-fold files and the test predictions of
a volume are the same whatever the scale.

The three stages without a CLI of their own run here, volume by volume, in the exact file formats
of the real ones: :func:`build_cache` (``VolumeStore.build``), :func:`write_planted_oof` (the
``oof/<volume_id>.npz`` of every member x fold and the classifier's ``oof.csv``) and
:func:`planted_submit` (``make submit`` from the blend on: post-processing, RLE, the CSV writer).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import EnsembleConfig
from pipeline.data.folds import fold_numbers, fold_volumes, read_folds
from pipeline.data.volumes import VolumeStore
from pipeline.datasets.base import DatasetSpec
from pipeline.datasets.uwmgi_files import decode_masks, load_split
from pipeline.infer.ensemble import CLS_OOF_FILE, OOF_DIR, run_name
from pipeline.infer.postprocess import apply_postprocess, read_decisions, to_uint8
from pipeline.infer.submit import check_decisions, read_volumes
from pipeline.io import write_csv, write_with
from pipeline.paths import run_dir
from pipeline.rle import encode_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberStyle:
    """How a planted member errs."""

    shift: float  # px: the largest per-volume translation along each axis
    sigma: float  # px: Gaussian blur of the mask edges
    gain: float  # probability in the middle of an organ
    miss: float  # share of a class's truth slices left empty
    spurious: float  # false-positive blobs per volume and class (Poisson mean)


STYLES = (MemberStyle(1.5, 1.5, 0.95, 0.03, 2.0), MemberStyle(3.0, 2.5, 0.85, 0.08, 4.0))


def volume_rng(volume_id: str, *keys: int) -> np.random.Generator:
    """A generator seeded by the volume id (stable across runs and processes) and ``keys``."""
    return np.random.default_rng([zlib.crc32(volume_id.encode()), *keys])


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigma)


def plant_probs(truth: np.ndarray, style: MemberStyle, rng: np.random.Generator) -> np.ndarray:
    """A member's uint8 probabilities ``round(p * 255)`` (S, C, H, W) made from truth masks (S, C, H, W)."""
    n_s, n_c, height, width = truth.shape
    out = np.zeros(truth.shape, dtype=np.uint8)
    dy, dx = rng.uniform(-style.shift, style.shift, 2)
    move = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
    scale = np.float32(255.0 * style.gain)
    for c in range(n_c):
        present = np.flatnonzero(truth[:, c].reshape(n_s, -1).any(axis=1))
        for s in present[rng.random(len(present)) >= style.miss]:
            moved = cv2.warpAffine(truth[s, c].astype(np.float32), move, (width, height))
            out[s, c] = np.rint(_blurred(moved, style.sigma) * scale)
        for _ in range(rng.poisson(style.spurious)):
            s0, depth = int(rng.integers(n_s)), int(rng.integers(1, 4))
            cy, cx = rng.uniform(0.25, 0.75, 2) * (height, width)
            disc = np.zeros((height, width), np.float32)
            cv2.circle(disc, (int(cx), int(cy)), int(rng.integers(2, 7)), 1.0, -1)
            blob = np.rint(_blurred(disc, style.sigma) * np.float32(255.0 * rng.uniform(0.35, 0.8)))
            for s in range(s0, min(n_s, s0 + depth)):
                np.maximum(out[s, c], blob.astype(np.uint8), out=out[s, c])
    return out


def plant_gate(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Classifier probabilities (S, C) float32: high where a class is present, low elsewhere, overlapping."""
    present = truth.reshape(*truth.shape[:2], -1).any(axis=2)
    return np.where(present, rng.beta(5.0, 1.5, present.shape), rng.beta(1.5, 5.0, present.shape)).astype(
        np.float32
    )


def member_names(cfg: EnsembleConfig) -> list[str]:
    """The run-folder names of the ensemble's members (a style each, in order)."""
    names = [run_name(m.config) for m in cfg.members]
    if not names or not cfg.classifier:
        raise ValueError(f"ensemble config '{cfg.name}' needs members and a classifier to plant predictions")
    return names


def classifier_name(cfg: EnsembleConfig) -> str:
    """The run-folder name of the ensemble's classifier (planted predictions need one)."""
    if not cfg.classifier:
        raise ValueError(f"ensemble config '{cfg.name}' needs a classifier to plant predictions")
    return run_name(cfg.classifier)


def _member_probs(truth: np.ndarray, volume_id: str, n_members: int) -> list[np.ndarray]:
    return [plant_probs(truth, STYLES[m % len(STYLES)], volume_rng(volume_id, m)) for m in range(n_members)]


# --------------------------------------------------------------------------- the planted stages


def build_cache(spec: DatasetSpec, root: Path, progress: bool = True) -> dict:
    """Decode every train volume into the ``VolumeStore`` cache (what training does on first use)."""
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    store.build(progress)
    return {"volumes": len(store.volume_ids)}


def _save_oof(path: Path, probs: np.ndarray, ids: list[str]) -> Path:
    return write_with(path, lambda tmp: np.savez_compressed(tmp, probs=probs, ids=np.asarray(ids)))


def write_planted_oof(spec: DatasetSpec, root: Path, cfg: EnsembleConfig, progress: bool = True) -> dict:
    """Every fold's validation volumes: ``oof/<volume_id>.npz`` per member, ``oof.csv`` of the classifier."""
    names = member_names(cfg)
    cls_name = classifier_name(cfg)
    store = VolumeStore(root, spec.load_split(root, "train"), "train", spec)
    folds = read_folds(root)
    plant_s = 0.0
    for fold in fold_numbers(folds):
        rows = []
        for volume_id in tqdm(
            fold_volumes(folds, fold)[1], desc=f"oof fold {fold}", unit="vol", disable=not progress
        ):
            volume = store[volume_id]
            truth = np.asarray(volume.mask)
            start = time.perf_counter()
            probs = _member_probs(truth, volume_id, len(names))
            gate = plant_gate(truth, volume_rng(volume_id, len(names)))
            plant_s += time.perf_counter() - start
            for name, p in zip(names, probs):
                _save_oof(run_dir("seg", name, fold) / OOF_DIR / f"{volume_id}.npz", p, volume.ids)
            frame = pd.DataFrame(gate, columns=list(spec.classes))
            rows.append(frame.assign(id=volume.ids, volume_id=volume_id))
        table = pd.concat(rows, ignore_index=True)
        write_csv(run_dir("cls", cls_name, fold) / CLS_OOF_FILE, table[["id", "volume_id", *spec.classes]])
    return {"plant_s": plant_s}


def planted_submit(
    spec: DatasetSpec, root: Path, cfg: EnsembleConfig, out: Path, progress: bool = True
) -> dict:
    """``make submit`` on planted member and classifier outputs: blend, post-processing, RLE, CSV.

    The test images are read as the real stage reads them (the next volume in the background);
    the planted probabilities come from ``test_labels.csv``, the phantom's hidden answers.
    """
    decisions = read_decisions(cfg.name)
    check_decisions(cfg, decisions)
    names = member_names(cfg)
    weights = decisions.weight_matrix(names).astype(np.float32)  # (classes, members), as EnsemblePredictor
    catalog = spec.prediction_catalog(root)
    truth_rows = {
        k: g for k, g in load_split(root, "test", "test_labels.csv").groupby("volume_id", sort=False)
    }
    writer = spec.submission_writer(root, out, catalog, encode_masks)
    plant_s = 0.0
    n_volumes = catalog["volume_id"].nunique()
    for volume in tqdm(
        read_volumes(spec, catalog), total=n_volumes, desc="submit", unit="vol", disable=not progress
    ):
        start = time.perf_counter()
        truth = decode_masks(truth_rows[volume.volume_id], "test_labels.csv")
        members = _member_probs(truth, volume.volume_id, len(names))
        gate = plant_gate(truth, volume_rng(volume.volume_id, len(names)))
        plant_s += time.perf_counter() - start
        blend = np.zeros(truth.shape, dtype=np.float32)
        for j, p in enumerate(members):  # the networks' float mean, weighted per class
            blend += weights[None, :, j, None, None] * (p.astype(np.float32) / np.float32(255.0))
        masks = apply_postprocess(to_uint8(blend), gate, decisions.classes, spec.volumetric)
        writer.add(volume, masks)
    writer.finish()
    return {"plant_s": plant_s, "volumes": n_volumes}


def run_planted(
    stage: str, spec: DatasetSpec, root: Path, cfg: EnsembleConfig, out: Path, progress: bool = True
) -> dict:
    """One planted stage by name (``cache``, ``oof`` or ``submit``) on the dataset ``spec``; what it reports."""
    if stage == "cache":
        return build_cache(spec, root, progress)
    if stage == "oof":
        return write_planted_oof(spec, root, cfg, progress)
    if stage == "submit":
        return planted_submit(spec, root, cfg, out, progress)
    raise ValueError(f"unknown planted stage '{stage}' (expected cache, oof or submit)")
