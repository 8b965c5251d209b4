"""A fold's validation volumes through the inference code: the per-epoch metric and the out-of-fold files.

Both run :func:`pipeline.models.predict.predict_volume` on every validation volume (no TTA), so a
member is validated the way it will be applied:

- seg: the 0.5-thresholded masks scored with the dataset's metric; ``oof/<volume_id>.npz`` with
  ``probs`` uint8 (S, classes, H, W) = round(p * 255) in the original geometry and ``ids`` (S,);
- cls: per-class ROC AUC and accuracy; ``oof.csv`` with ``id, volume_id`` and one probability column
  per class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import ClsConfig, MemberConfig, SegConfig, TTACfg
from pipeline.data.volumes import Volume
from pipeline.io import write_csv, write_with
from pipeline.models.predict import predict_volume, tta_views
from pipeline.train.engine import Validate
from pipeline.train.fold_data import FoldData

THRESHOLD = 0.5  # validation only; the submission thresholds are tuned on OOF by `make tune`


def val_predictions(
    model: nn.Module,
    cfg: MemberConfig,
    data: FoldData,
    device: torch.device,
    desc: str,
    progress: bool = True,
    leave: bool = True,
    tta: TTACfg | None = None,
) -> Iterator[tuple[Volume, np.ndarray]]:
    """(volume, probabilities) of every validation volume of the fold, in order (see :func:`predict_volume`);
    ``tta``: the views averaged (None: the plain view)."""
    batch_size = cfg.train.val_batch_size or cfg.train.batch_size
    for volume_id in tqdm(data.val_volumes, desc=desc, unit="vol", leave=leave, disable=not progress):
        volume = data.store[volume_id]
        probs = predict_volume(
            model,
            cfg,
            volume.image,
            data.boxes[volume_id],
            device=device,
            batch_size=batch_size,
            tta=tta,
            amp=cfg.train.amp,
        )
        yield volume, probs


def seg_validator(cfg: SegConfig, data: FoldData, device: torch.device, progress: bool = True) -> Validate:
    """Per epoch: every validation volume through ``predict_volume``, masks at 0.5, the dataset's metric."""
    spec = data.store.spec

    def validate(model: nn.Module, epoch: int) -> dict[str, float]:
        stats = [
            spec.fast_stats(probs > THRESHOLD, np.asarray(volume.mask, dtype=bool))
            for volume, probs in val_predictions(
                model, cfg, data, device, f"validate {epoch}", progress, False
            )
        ]
        result = spec.aggregate(stats)
        return {key: result[key] for key in spec.metric_keys}

    return validate


def cls_metrics(truth: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """Per-class ROC AUC (NaN for a class with one label value) and accuracy at 0.5.

    ``score`` is the mean AUC over the classes where it is defined; the mean accuracy when none is.
    """
    from sklearn.metrics import roc_auc_score

    out: dict[str, float] = {}
    aucs, accs = [], []
    for c, name in enumerate(classes):
        t, p = truth[:, c].astype(bool), probs[:, c]
        auc = float(roc_auc_score(t, p)) if 0 < t.sum() < len(t) else math.nan
        acc = float(((p > THRESHOLD) == t).mean()) if len(t) else math.nan
        out[f"auc_{name}"], out[f"acc_{name}"] = auc, acc
        aucs += [auc] if math.isfinite(auc) else []
        accs.append(acc)
    out["acc"] = float(np.mean(accs))
    out["score"] = float(np.mean(aucs)) if aucs else out["acc"]
    return out


def cls_predictions(
    model: nn.Module, cfg: ClsConfig, data: FoldData, device: torch.device, progress: bool = False
) -> pd.DataFrame:
    """OOF table of the validation volumes: id, volume_id, one probability column per class, truth."""
    classes = data.store.spec.classes
    frames = []
    for volume, probs in val_predictions(model, cfg, data, device, "classify", progress, False):
        frame = pd.DataFrame(probs, columns=list(classes))
        frame.insert(0, "volume_id", volume.volume_id)
        frame.insert(0, "id", volume.ids)
        truth = data.store.spec.presence_of(data.store.catalog, volume.ids)
        for c, name in enumerate(classes):
            frame[f"truth_{name}"] = truth[:, c]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def cls_validator(cfg: ClsConfig, data: FoldData, device: torch.device, progress: bool = True) -> Validate:
    classes = data.store.spec.classes

    def validate(model: nn.Module, epoch: int) -> dict[str, float]:
        frame = cls_predictions(model, cfg, data, device)
        truth = frame[[f"truth_{c}" for c in classes]].to_numpy()
        return cls_metrics(truth, frame[list(classes)].to_numpy(), classes)

    return validate


def _save_npz(path: Path, probs: np.ndarray, ids: np.ndarray) -> Path:
    return write_with(path, lambda tmp: np.savez_compressed(tmp, probs=probs, ids=ids))


def write_seg_oof(
    model: nn.Module,
    cfg: SegConfig,
    data: FoldData,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> Path:
    """``oof/<volume_id>.npz`` (probs uint8 (S, classes, H, W), ids) for every validation volume, with the
    views of ``oof_tta`` averaged."""
    folder = out_dir / "oof"
    tta = None if tta_views(cfg.oof_tta) == tta_views(None) else cfg.oof_tta  # the plain view: as before
    for volume, probs in val_predictions(model, cfg, data, device, "oof", progress, tta=tta):
        probs_u8 = np.rint(np.clip(probs, 0.0, 1.0) * 255).astype(np.uint8)
        _save_npz(folder / f"{volume.volume_id}.npz", probs_u8, np.asarray(volume.ids))
    return folder


def write_cls_oof(
    model: nn.Module,
    cfg: ClsConfig,
    data: FoldData,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> Path:
    frame = cls_predictions(model, cfg, data, device)
    return write_csv(out_dir / "oof.csv", frame[["id", "volume_id", *data.store.spec.classes]])
