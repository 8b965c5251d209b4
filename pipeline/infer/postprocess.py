"""Post-processing decided on out-of-fold predictions, and the file that carries the decisions.

Per class, in this order: pixel threshold on the (blended) probability, classifier gate (a slice
whose classifier probability for the class is below ``gate_threshold`` is emptied), removal of
connected components smaller than ``min_component_size`` voxels: 3D and 26-connected within a
volume for volumetric datasets, 2D and 8-connected within each image otherwise (``volumetric``).
Probabilities travel as uint8 (``round(p * 255)``, the out-of-fold format), so the threshold that
was tuned on OOF files is applied bit for bit the same way at submission time.

Every number comes from ``runs/ensemble/<cfg>/postprocess.json`` (written by ``make tune``);
nothing here has a default that inference could fall back on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.paths import run_dir

POSTPROCESS_FILE = "postprocess.json"
FORMAT_VERSION = 1
_STRUCTURE_26 = ndimage.generate_binary_structure(3, 3)
_STRUCTURE_2D = np.zeros((3, 3, 3), bool)
_STRUCTURE_2D[1] = True  # 8-connected in-plane, never across slices


class DecisionsError(PipelineError, ValueError):
    """postprocess.json is missing or does not fit the ensemble config; the message says what to run."""


@dataclass(frozen=True)
class ClassParams:
    """What turns one class's probabilities into its mask."""

    pixel_threshold: float
    gate_threshold: float
    min_component_size: int

    def with_value(self, field_name: str, value: float) -> ClassParams:
        cast = int if field_name == "min_component_size" else float
        return replace(self, **{field_name: cast(value)})


@dataclass
class Decisions:
    """The content of postprocess.json: post-processing per class, blend weights, and how they scored."""

    classes: dict[str, ClassParams]  # in the dataset's class order
    weights: dict[str, float]  # member config name -> blend weight (sum 1)
    members: list[dict[str, Any]]  # [{"config": name, "folds": [..]}]
    classifier: dict[str, Any] | None = None  # {"config": name, "folds": [..]} or None (no gate)
    ensemble: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)  # OOF score after each tuning step
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)  # final OOF table
    curves: dict[str, Any] = field(default_factory=dict)  # step -> class -> {values, score, ...}
    oof: dict[str, Any] = field(default_factory=dict)  # days, slices, ...
    dataset: str = "uwmgi"
    volumetric: bool = True  # components are 3D (volumes) or per image

    def params(self) -> list[ClassParams]:
        """Per-class parameters in the dataset's class order."""
        return list(self.classes.values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = {name: asdict(p) for name, p in self.classes.items()}
        return {"version": FORMAT_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "postprocess.json") -> Decisions:
        try:
            classes = {name: ClassParams(**value) for name, value in data["classes"].items()}
            kwargs = {k: data[k] for k in ("weights", "members")}
        except (KeyError, TypeError, AttributeError) as exc:
            raise DecisionsError(f"{where}: malformed ({exc!r}); rerun `make tune`") from None
        optional = ("classifier", "ensemble", "steps", "per_class", "curves", "oof", "dataset", "volumetric")
        return cls(classes=classes, **kwargs, **{k: data[k] for k in optional if k in data})


def decisions_path(ensemble_name: str) -> Path:
    return run_dir("ensemble", ensemble_name) / POSTPROCESS_FILE


def write_decisions(path: Path, decisions: Decisions) -> Path:
    return write_json(path, _finite(decisions.to_json()))


def read_decisions(ensemble_name: str, path: Path | None = None) -> Decisions:
    """The tuned decisions of an ensemble config; a clear error telling to run ``make tune`` when absent."""
    path = Path(path) if path is not None else decisions_path(ensemble_name)
    if not path.is_file():
        raise DecisionsError(
            f"post-processing decisions not found: {path}. Run `make tune ENSEMBLE=configs/{ensemble_name}.yaml` "
            "(python -m stages.tune --config ...) on the out-of-fold predictions first."
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise DecisionsError(f"{path}: not valid JSON ({exc}); rerun `make tune`") from None
    return Decisions.from_json(data, str(path))


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- probabilities


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 ``round(p * 255)`` (the OOF format)."""
    out = np.asarray(probs, dtype=np.float32) * 255.0
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out, out=out).astype(np.uint8)


def prob_level(threshold: float) -> int:
    """The uint8 level of a probability threshold: a pixel is foreground when ``q >= level``."""
    return int(np.clip(round(threshold * 255.0), 0, 256))


def threshold_probs(probs_u8: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of uint8 probabilities at a threshold in [0, 1]."""
    if probs_u8.dtype != np.uint8:
        raise TypeError(f"threshold_probs expects uint8 probabilities (round(p*255)), got {probs_u8.dtype}")
    return probs_u8 >= prob_level(threshold)


def gate_slices(mask: np.ndarray, gate_probs: np.ndarray | None, gate_threshold: float) -> np.ndarray:
    """Empty (in place) the slices of a (S, H, W) mask whose gate probability is below the threshold."""
    if gate_probs is None or gate_threshold <= 0.0:
        return mask
    gate_probs = np.asarray(gate_probs)
    if gate_probs.shape != mask.shape[:1]:
        raise ValueError(f"gate probabilities {gate_probs.shape} do not match the {mask.shape[0]} slices")
    mask[gate_probs < gate_threshold] = False
    return mask


def foreground_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (one slice per axis) of a (S, H, W) mask holding its foreground; None when empty."""
    hits_s = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    if hits_s.size == 0:
        return None
    plane = mask[hits_s[0] : hits_s[-1] + 1].any(axis=0)
    hits_h, hits_w = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return tuple(slice(int(h[0]), int(h[-1]) + 1) for h in (hits_s, hits_h, hits_w))


@dataclass(frozen=True)
class Components:
    """26-connected 3D components of a (S, H, W) mask, labelled inside its foreground box only.

    Labelling the box instead of the whole day-volume gives the same components (nothing lies
    outside it) several times faster, which matters when tuning re-labels every candidate.
    """

    shape: tuple[int, ...]
    box: tuple[slice, ...] | None  # None: empty mask
    labels: np.ndarray  # int32 labels inside ``box``
    sizes: np.ndarray  # voxel count per label, [0] = 0

    @classmethod
    def of(cls, mask: np.ndarray, volumetric: bool = True) -> Components:
        """Components of a (S, H, W) mask: 3D 26-connected, or per slice 8-connected (``volumetric=False``)."""
        mask = np.asarray(mask, dtype=bool)
        box = foreground_box(mask)
        if box is None:
            return cls(mask.shape, None, np.zeros((0,) * mask.ndim, np.int32), np.zeros(1, np.int64))
        structure = _STRUCTURE_26 if volumetric else _STRUCTURE_2D
        labels, n = ndimage.label(mask[box], structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        return cls(mask.shape, box, labels, sizes)

    def keep(self, min_size: int) -> np.ndarray:
        """The full-size mask of the components with at least ``min_size`` voxels."""
        out = np.zeros(self.shape, dtype=bool)
        if self.box is not None:
            keep = self.sizes >= max(1, min_size)
            keep[0] = False
            out[self.box] = keep[self.labels]
        return out


def remove_small_components(mask: np.ndarray, min_size: int, volumetric: bool = True) -> np.ndarray:
    """Drop connected components of a (S, H, W) mask smaller than ``min_size`` voxels (see :class:`Components`)."""
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask
    return Components.of(mask, volumetric).keep(min_size)


def apply_class(
    probs_u8: np.ndarray, gate_probs: np.ndarray | None, params: ClassParams, volumetric: bool = True
) -> np.ndarray:
    """(S, H, W) uint8 probabilities of one class -> its post-processed (S, H, W) bool mask."""
    mask = threshold_probs(probs_u8, params.pixel_threshold)
    gate_slices(mask, gate_probs, params.gate_threshold)
    return remove_small_components(mask, params.min_component_size, volumetric)


def apply_postprocess(
    probs_u8: np.ndarray,
    gate_probs: np.ndarray | None,
    params: list[ClassParams] | dict[str, ClassParams],
    volumetric: bool = True,
) -> np.ndarray:
    """A volume's (S, C, H, W) uint8 probabilities (+ (S, C) gate probabilities or None) -> bool masks."""
    if isinstance(params, dict):
        params = list(params.values())
    if probs_u8.ndim != 4 or probs_u8.shape[1] != len(params):
        raise ValueError(f"expected (S, {len(params)}, H, W) probabilities, got {probs_u8.shape}")
    out = np.empty(probs_u8.shape, dtype=bool)
    for c, p in enumerate(params):
        gate = None if gate_probs is None else gate_probs[:, c]
        out[:, c] = apply_class(probs_u8[:, c], gate, p, volumetric)
    return out
