"""Post-processing decided on out-of-fold predictions, and the file that carries the decisions.

Each class of a volume goes through the steps of :mod:`pipeline.infer.steps` in their order
(pixel threshold, classifier gate, probability gate, z-continuity, small components), each a tuned
option that ``make tune`` may leave off: :func:`apply_class` is that loop. Probabilities travel as
uint8 (``round(p * 255)``, the out-of-fold format), so what was tuned on OOF files is applied bit
for bit the same way at submission time.

Every number comes from ``runs/ensemble/<cfg>/postprocess.json`` (written by ``make tune``): per class
the :class:`ClassParams` and the member blend weights (``{class: {member: weight}}``), with how the
search scored (the step rows, the curves, :class:`OOFSummary`). Files of format 1 (one weight per
member, no probability gate or z-continuity) are still read: their weights apply to every class and
the new options are off.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.infer.masks import to_uint8
from pipeline.infer.step_base import ClassInput, ClassParams
from pipeline.infer.steps import registry
from pipeline.io import write_json
from pipeline.paths import run_dir

__all__ = [  # to_uint8 lives in masks; imported from here by callers outside infer
    "ClassParams",
    "Decisions",
    "DecisionsError",
    "OOFSummary",
    "apply_class",
    "apply_postprocess",
    "decisions_path",
    "read_decisions",
    "to_uint8",
    "write_decisions",
]

POSTPROCESS_FILE = "postprocess.json"
FORMAT_VERSION = 2  # 2: per-class blend weights, probability gate, z-continuity

Weights = dict[str, dict[str, float]]  # class -> member config name -> blend weight (each class sums to 1)


class DecisionsError(PipelineError, ValueError):
    """postprocess.json is missing or does not fit the ensemble config; the message says what to run."""


# --------------------------------------------------------------------------- what tuning measured


@dataclass
class BlendGain:
    """The tuned blend against its best member alone, both at the tuned post-processing."""

    over: str  # the best member alone (in-sample)
    score: float  # in-sample gain
    held_out: float | None  # gain on the held-apart groups (None: no held-apart split)


@dataclass
class BlendGuard:
    """The blend guard's verdict: a member alone beat the blend on the held-apart groups and was kept."""

    kept: str
    blend_held_out: float
    alone_held_out: float
    blend_score: float | None = None  # the blend's in-sample score (its search is not saved)
    blend_weights: Weights = field(default_factory=dict)


@dataclass
class Grids:
    """What the search tried: each step's candidates (registry order) and the blend grid."""

    steps: dict[str, list[Any]]
    blend_steps: int | None = None
    sweeps: int | None = None
    per_class_blend: bool | None = None

    def to_json(self) -> dict[str, Any]:
        rest = {k: v for k, v in asdict(self).items() if k != "steps"}
        return {**self.steps, **rest}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Grids:
        known = {f.name for f in dataclasses.fields(cls)} - {"steps"}
        return cls(
            {k: v for k, v in data.items() if k not in known}, **{k: data[k] for k in known & set(data)}
        )


@dataclass
class OOFSummary:
    """The tuned ensemble on its out-of-fold volumes (``oof`` in postprocess.json)."""

    days: int = 0  # OOF volumes (the file's key)
    slices: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # "score" and the dataset's other means (numbers)
    held_out: float | None = None  # score on the held-apart groups, settings chosen on the rest
    blend_gain: BlendGain | None = None  # None with one member
    blend_guard: BlendGuard | None = None  # None: the blend stands
    grids: Grids | None = None

    @property
    def score(self) -> float | None:
        return self.metrics.get("score")

    def to_json(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "slices": self.slices,
            **self.metrics,
            "held_out": self.held_out,
            "blend_gain": None if self.blend_gain is None else asdict(self.blend_gain),
            "blend_guard": None if self.blend_guard is None else asdict(self.blend_guard),
            "grids": None if self.grids is None else self.grids.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OOFSummary:
        rest = dict(data)
        gain, guard, grids = (rest.pop(k, None) for k in ("blend_gain", "blend_guard", "grids"))
        out = cls(
            days=int(rest.pop("days", 0)),
            slices=int(rest.pop("slices", 0)),
            held_out=rest.pop("held_out", None),
            blend_gain=None if gain is None else BlendGain(**gain),
            blend_guard=None if guard is None else BlendGuard(**guard),
            grids=None if grids is None else Grids.from_json(grids),
        )
        bad = [k for k, v in rest.items() if v is not None and not isinstance(v, (int, float))]
        if bad:
            raise ValueError(f"oof figures {bad} are not numbers")
        out.metrics = rest
        return out


# --------------------------------------------------------------------------- the decisions


@dataclass
class Decisions:
    """The content of postprocess.json: post-processing per class, blend weights, and how they scored."""

    classes: dict[str, ClassParams]  # in the dataset's class order
    weights: Weights  # per class: member config name -> blend weight
    members: list[dict[str, Any]]  # [{"config": name, "folds": [..]}]
    classifier: dict[str, Any] | None = None  # {"config": name, "folds": [..]} or None (no gate)
    ensemble: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)  # score (all volumes) and held_out per step
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)  # final OOF table
    curves: dict[str, Any] = field(default_factory=dict)  # step -> class -> {values, score, ...}
    oof: OOFSummary = field(default_factory=OOFSummary)
    dataset: str = "uwmgi"
    volumetric: bool = True  # components are 3D (volumes) or per image
    holdout: dict[str, Any] = field(default_factory=dict)  # the held-apart split and its scores

    def __post_init__(self) -> None:
        flat = self.weights and all(isinstance(v, (int, float)) for v in self.weights.values())
        if flat:  # one weight per member (format 1, or written by hand): the same for every class
            row: dict[str, Any] = dict(self.weights)
            self.weights = {cls: dict(row) for cls in self.classes}

    def params(self) -> list[ClassParams]:
        """Per-class parameters in the dataset's class order."""
        return list(self.classes.values())

    def needs_classifier(self) -> bool:
        """Whether some class uses a step that reads the classifier (else it need not be loaded)."""
        return registry().needs_classifier(self.params())

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
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["classes"] = {name: asdict(p) for name, p in self.classes.items()}
        out["oof"] = self.oof.to_json()
        return {"version": FORMAT_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "postprocess.json") -> Decisions:
        try:
            version = int(data.get("version", 1))
            if version > FORMAT_VERSION:
                raise ValueError(f"format {version} is newer than this code's {FORMAT_VERSION}")
            params = registry().params
            classes = {name: params(**value) for name, value in data["classes"].items()}
            kwargs = {k: data[k] for k in ("weights", "members")}
            optional = (
                "classifier",
                "ensemble",
                "steps",
                "per_class",
                "curves",
                "dataset",
                "volumetric",
                "holdout",
            )
            out = cls(classes=classes, **kwargs, **{k: data[k] for k in optional if k in data})
            if "oof" in data:
                out.oof = OOFSummary.from_json(data["oof"])
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


# --------------------------------------------------------------------------- applying them


def apply_class(
    probs_u8: np.ndarray, gate_probs: np.ndarray | None, params: ClassParams, volumetric: bool = True
) -> np.ndarray:
    """(S, H, W) uint8 probabilities of one class -> its post-processed (S, H, W) bool mask (every step)."""
    return registry().apply(ClassInput(probs_u8, gate_probs, volumetric), params)


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
