"""The body detector's training set, in the folder layout ultralytics reads (no ultralytics import).

Labels come from the images themselves: each sampled slice gets its intensity-threshold body box
(:func:`pipeline.data.geometry.threshold_box`); a slice where none is found is a negative (an
empty label file). ``det.slices_per_volume`` seeded slices of every train volume are written as 8-bit
PNGs, split into train/val by case, with a ``data.yaml`` naming the single class ``body``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm.auto import tqdm

from pipeline.config import DetParams
from pipeline.data.geometry import Box, normalize, threshold_box
from pipeline.data.volumes import VolumeStore

log = logging.getLogger(__name__)

CLASS_NAME = "body"


def slice_to_uint8(image: np.ndarray) -> np.ndarray:
    """A uint16 slice (H, W) as the detector sees it: uint8 scaled by its own robust maximum."""
    return (np.clip(normalize(image), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def yolo_label(box: Box | None, shape: tuple[int, int]) -> str:
    """One YOLO label line ``0 xc yc w h`` (normalised), or "" for a negative slice."""
    if box is None:
        return ""
    height, width = shape
    xc, yc = (box.x0 + box.x1) / 2 / width, (box.y0 + box.y1) / 2 / height
    return f"0 {xc:.6f} {yc:.6f} {box.width / width:.6f} {box.height / height:.6f}\n"


def split_cases(cases: list, val_fraction: float, rng: np.random.Generator) -> set[int]:
    """Validation groups (cases, patients): ``val_fraction`` of them (at least one, never all); none if one."""
    if len(cases) < 2 or val_fraction <= 0:
        return set()
    n_val = min(len(cases) - 1, max(1, round(val_fraction * len(cases))))
    return {c.item() for c in rng.permutation(sorted(cases))[:n_val]}  # numpy scalar -> int or str


def write_yolo_dataset(store: VolumeStore, params: DetParams, out: Path) -> tuple[Path, dict[str, int]]:
    """Write ``out/{images,labels}/{train,val}/`` and ``out/data.yaml``; returns (data.yaml, counts).

    The folder is built beside ``out`` and swapped in whole, so a crash never leaves half a dataset.
    """
    rng = np.random.default_rng(params.seed)
    case_of = dict(zip(store.catalog["volume_id"], store.catalog["group"]))
    val_cases = split_cases(sorted(set(case_of.values())), params.val_fraction, rng)
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("images/train", "images/val", "labels/train", "labels/val"):
        (work / sub).mkdir(parents=True)
    counts = {"train_images": 0, "train_negatives": 0, "val_images": 0, "val_negatives": 0}
    for volume_id in tqdm(store.volume_ids, desc="yolo dataset", unit="vol"):
        volume = store[volume_id]
        planes = volume.gray()
        subset = "val" if case_of[volume_id] in val_cases else "train"
        picks = np.sort(
            rng.choice(len(volume), size=min(params.slices_per_volume, len(volume)), replace=False)
        )
        for s in picks:
            image = np.asarray(planes[s])
            png = work / "images" / subset / f"{volume.ids[s]}.png"
            if not cv2.imwrite(str(png), slice_to_uint8(image)):
                raise OSError(f"could not write {png}")
            box = threshold_box(image, params.threshold_quantile, params.threshold_scale)
            (work / "labels" / subset / f"{volume.ids[s]}.txt").write_text(yolo_label(box, image.shape))
            counts[f"{subset}_images"] += 1
            counts[f"{subset}_negatives"] += box is None
    val = "images/val"
    if not val_cases:
        log.warning("only one case (or det.val_fraction=0): validating on the training images")
        val = "images/train"
    spec = {"path": str(out.resolve()), "train": "images/train", "val": val, "names": {0: CLASS_NAME}}
    (work / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    work.replace(out)
    log.info("YOLO dataset %s: %s (validation cases %s)", out, counts, sorted(val_cases))
    return out / "data.yaml", counts
