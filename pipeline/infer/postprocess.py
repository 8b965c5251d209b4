"""Post-processing decided on out-of-fold predictions, and the file that carries the decisions.

Per class, in this order (:data:`STAGES`), each step a tuned option that ``make tune`` may leave off:

1. ``pixel_threshold``: a pixel is foreground when its (blended) uint8 probability ``q >= round(t * 255)``;
2. ``gate_threshold``: the classifier gate; a slice whose classifier probability for the class is below
   it is emptied (0 = off);
3. ``prob_gate`` (``prob_gate_pixels`` N, ``prob_gate_level`` t): the gate on the blended probability
   itself (1st place, N = 12, t = 0.6 by hand); a slice keeps the class only if more than N of its
   pixels have ``q >= round(t * 255)`` (N = 0 = off);
4. ``z_run`` (k): z-continuity over a volume (3rd place), volumetric datasets only; the class's first
   slice is the start of the first run of >= k consecutive non-empty slices, its last slice the end of
   the last such run, and every slice outside [first, last] is emptied (gaps inside stay as they are).
   A volume with no run of k slices has the class emptied altogether: an organ seen on fewer than k
   consecutive slices is taken as a false positive (the option is switched off by tuning where that
   costs score). k <= 1 = off;
5. ``min_component_size``: connected components smaller than this many voxels are removed: 3D and
   26-connected within a volume for volumetric datasets, 2D and 8-connected within each image otherwise.

Steps 2-4 only empty whole slices, so their order among themselves changes nothing except for the
z-continuity, which sees the slices the gates left. Probabilities travel as uint8 (``round(p * 255)``,
the out-of-fold format), so what was tuned on OOF files is applied bit for bit the same way at
submission time.

Every number comes from ``runs/ensemble/<cfg>/postprocess.json`` (written by ``make tune``): per class
the :class:`ClassParams` and the member blend weights (``{class: {member: weight}}``). Files of format 1
(one weight per member, no probability gate or z-continuity) are still read: their weights apply to
every class and the new options are off.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import PipelineError
from pipeline.io import write_json
from pipeline.paths import run_dir

POSTPROCESS_FILE = "postprocess.json"
FORMAT_VERSION = 2  # 2: per-class blend weights, probability gate, z-continuity
STAGES = ("pixel_threshold", "gate_threshold", "prob_gate", "z_run", "min_component_size")
SLICE_STAGES = ("gate_threshold", "prob_gate", "z_run")  # the stages that empty whole slices
_INT_FIELDS = ("min_component_size", "prob_gate_pixels", "z_run")
_STRUCTURE_26 = ndimage.generate_binary_structure(3, 3)
_STRUCTURE_2D = np.zeros((3, 3, 3), bool)
_STRUCTURE_2D[1] = True  # 8-connected in-plane, never across slices


class DecisionsError(PipelineError, ValueError):
    """postprocess.json is missing or does not fit the ensemble config; the message says what to run."""


@dataclass(frozen=True)
class ClassParams:
    """What turns one class's probabilities into its mask (the stages of the module doc, in order).

    The fields added in format 2 default to "off", which is what a format-1 file meant.
    """

    pixel_threshold: float
    gate_threshold: float
    min_component_size: int
    prob_gate_pixels: int = 0  # N: keep a slice only if more than N pixels have q >= level; 0 = off
    prob_gate_level: float = 0.0  # t of the probability gate (unused while N = 0)
    z_run: int = 0  # k: z-continuity from runs of >= k non-empty slices; <= 1 = off

    def setting(self, stage: str) -> Any:
        """The value of one tuning stage: a field, or ``(N, t)`` for ``prob_gate``."""
        if stage == "prob_gate":
            return (self.prob_gate_pixels, self.prob_gate_level)
        return getattr(self, stage)

    def with_value(self, stage: str, value: Any) -> ClassParams:
        """A copy with one stage set: a field name, or ``prob_gate`` with ``(N, t)`` (N <= 0: off, t 0)."""
        if stage == "prob_gate":
            pixels, level = value
            pixels = int(pixels)
            return replace(
                self, prob_gate_pixels=max(0, pixels), prob_gate_level=float(level) if pixels > 0 else 0.0
            )
        if stage not in {f.name for f in fields(self)}:
            raise ValueError(f"unknown post-processing stage '{stage}' (expected one of {STAGES})")
        cast = int if stage in _INT_FIELDS else float
        return replace(self, **{stage: cast(value)})


Weights = dict[str, dict[str, float]]  # class -> member config name -> blend weight (each class sums to 1)


@dataclass
class Decisions:
    """The content of postprocess.json: post-processing per class, blend weights, and how they scored."""

    classes: dict[str, ClassParams]  # in the dataset's class order
    weights: Weights  # per class: member config name -> blend weight
    members: list[dict[str, Any]]  # [{"config": name, "folds": [..]}]
    classifier: dict[str, Any] | None = None  # {"config": name, "folds": [..]} or None (no gate)
    ensemble: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)  # score (all days) and held_out per step
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)  # final OOF table
    curves: dict[str, Any] = field(default_factory=dict)  # step -> class -> {values, score, ...}
    oof: dict[str, Any] = field(default_factory=dict)  # days, slices, ...
    dataset: str = "uwmgi"
    volumetric: bool = True  # components are 3D (volumes) or per image
    holdout: dict[str, Any] = field(default_factory=dict)  # the held-apart split and its scores

    def __post_init__(self) -> None:
        flat = self.weights and all(isinstance(v, (int, float)) for v in self.weights.values())
        if flat:  # one weight per member (format 1, or written by hand): the same for every class
            self.weights = {cls: dict(self.weights) for cls in self.classes}

    def params(self) -> list[ClassParams]:
        """Per-class parameters in the dataset's class order."""
        return list(self.classes.values())

    def weight_matrix(self, names: list[str] | None = None) -> np.ndarray:
        """(classes, members) blend weights in class order and ``names`` order (default: ``members``)."""
        names = names if names is not None else [m["config"] for m in self.members]
        try:
            return np.array([[self.weights[cls].get(n, 0.0) for n in names] for cls in self.classes], float)
        except (KeyError, AttributeError) as exc:
            raise DecisionsError(
                f"postprocess.json of '{self.ensemble}' has no blend weights for {exc}; rerun `make tune`"
            ) from None

    def used_members(self) -> list[str]:
        """The members with a weight above 0 in some class (the others need not be loaded)."""
        names = [m["config"] for m in self.members]
        used = self.weight_matrix(names).max(axis=0, initial=0.0) > 0 if self.classes else []
        return [n for n, u in zip(names, used) if u]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = {name: asdict(p) for name, p in self.classes.items()}
        return {"version": FORMAT_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "postprocess.json") -> Decisions:
        try:
            version = int(data.get("version", 1))
            if version > FORMAT_VERSION:
                raise ValueError(f"format {version} is newer than this code's {FORMAT_VERSION}")
            classes = {name: ClassParams(**value) for name, value in data["classes"].items()}
            kwargs = {k: data[k] for k in ("weights", "members")}
            optional = (
                "classifier",
                "ensemble",
                "steps",
                "per_class",
                "curves",
                "oof",
                "dataset",
                "volumetric",
                "holdout",
            )
            out = cls(classes=classes, **kwargs, **{k: data[k] for k in optional if k in data})
            for cls_name, row in out.weights.items():
                if cls_name not in classes or not isinstance(row, dict):
                    raise ValueError(f"weights of '{cls_name}' are not a {{member: weight}} of a known class")
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DecisionsError(f"{where}: malformed ({exc!r}); rerun `make tune`") from None
        return out


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


def gate_keep(gate_probs: np.ndarray | None, gate_threshold: float, n_slices: int) -> np.ndarray | None:
    """(S,) the slices whose classifier probability reaches the threshold; None (all) when off."""
    if gate_probs is None or gate_threshold <= 0.0:
        return None
    gate_probs = np.asarray(gate_probs)
    if gate_probs.shape != (n_slices,):
        raise ValueError(f"gate probabilities {gate_probs.shape} do not match the {n_slices} slices")
    return gate_probs >= gate_threshold


def gate_slices(mask: np.ndarray, gate_probs: np.ndarray | None, gate_threshold: float) -> np.ndarray:
    """Empty (in place) the slices of a (S, H, W) mask whose gate probability is below the threshold."""
    return empty_slices(mask, gate_keep(gate_probs, gate_threshold, len(mask)))


def prob_gate_keep(probs_u8: np.ndarray, pixels: int, level: float) -> np.ndarray | None:
    """(S,) the slices of (S, H, W) uint8 probabilities with more than ``pixels`` pixels at ``q >= level``.

    None (every slice) when the gate is off (``pixels <= 0``).
    """
    if pixels <= 0:
        return None
    hits = threshold_probs(probs_u8, level).reshape(len(probs_u8), -1)
    return np.count_nonzero(hits, axis=1) > pixels


def z_range(positive: np.ndarray, run: int) -> tuple[int, int] | None:
    """[first, last] (inclusive) of a (S,) bool slice vector by runs of >= ``run`` consecutive Trues.

    ``first`` starts the first such run, ``last`` ends the last one; None when no run is that long.
    """
    padded = np.concatenate([[0], np.asarray(positive, dtype=np.int8), [0]])
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # runs are [start, end)
    long = np.flatnonzero(ends - starts >= max(1, run))
    if long.size == 0:
        return None
    return int(starts[long[0]]), int(ends[long[-1]] - 1)


def z_keep(mask: np.ndarray, run: int) -> np.ndarray | None:
    """(S,) the slices of a (S, H, W) mask that z-continuity keeps; None (all) when ``run <= 1``."""
    if run <= 1:
        return None
    keep = np.zeros(len(mask), dtype=bool)
    span = z_range(mask.reshape(len(mask), -1).any(axis=1), run)
    if span is not None:
        keep[span[0] : span[1] + 1] = True
    return keep


def slice_keep(
    stage: str,
    mask: np.ndarray,
    probs_u8: np.ndarray,
    gate_probs: np.ndarray | None,
    params: ClassParams,
    volumetric: bool = True,
) -> np.ndarray | None:
    """(S,) the slices one of :data:`SLICE_STAGES` keeps on the mask so far; None: every slice."""
    if stage == "gate_threshold":
        return gate_keep(gate_probs, params.gate_threshold, len(mask))
    if stage == "prob_gate":
        return prob_gate_keep(probs_u8, params.prob_gate_pixels, params.prob_gate_level)
    if stage == "z_run":
        if params.z_run > 1 and not volumetric:
            raise ValueError(
                f"z_run = {params.z_run}: z-continuity needs volumes, but this dataset's images are 2D; "
                "set tune.z_runs: [0] and rerun `make tune`"
            )
        return z_keep(mask, params.z_run)
    raise ValueError(f"'{stage}' is not a slice stage (expected one of {SLICE_STAGES})")


def empty_slices(mask: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """Empty (in place) the slices of a (S, H, W) mask that ``keep`` (S,) does not keep."""
    if keep is not None:
        mask[~keep] = False
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

    def n_kept(self, min_size: int) -> int:
        """How many components :meth:`keep` keeps: equal counts mean equal masks (sizes only rise)."""
        return int(np.count_nonzero(self.sizes >= max(1, min_size)))

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
    """(S, H, W) uint8 probabilities of one class -> its post-processed (S, H, W) bool mask (:data:`STAGES`)."""
    mask = threshold_probs(probs_u8, params.pixel_threshold)
    for stage in SLICE_STAGES:
        empty_slices(mask, slice_keep(stage, mask, probs_u8, gate_probs, params, volumetric))
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
