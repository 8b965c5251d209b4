"""The post-processing steps as records, in the order they apply: the one list every module iterates.

Per class of a volume, each step a tuned option that ``make tune`` may leave off:

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
   consecutive slices is taken as a false positive (tuning switches the option off where that costs
   score). k <= 1 = off;
5. ``min_component_size``: connected components smaller than this many voxels are removed: 3D and
   26-connected within a volume for volumetric datasets, 2D and 8-connected within each image otherwise.
6. ``component_fraction`` (f): components smaller than f x the largest one are removed (the volume's
   largest in 3D, each image's own in 2D); f = 1 keeps the largest only, for a class that is one
   object (an LGG tumour, a nerve); 0 = off.

Steps 2-4 only empty whole slices, so their order among themselves changes nothing except for the
z-continuity, which sees the slices the gates left.

:data:`REGISTRY` holds the records with the parameter record they fill. ``apply_class``
(:mod:`pipeline.infer.postprocess`), the search (:mod:`pipeline.infer.search`), the scoring
(:mod:`pipeline.infer.evaluate`), ``postprocess.json`` and ``make cv`` loop over it; none of them
names a step. Adding a step: its record here (of a kind in :mod:`pipeline.infer.step_base`, or a new
kind), the field(s) it sets in :class:`ClassParams` with its "off" value as the default (older files
still read), its grid key in ``TuneCfg``, and its tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import TuneCfg
from pipeline.infer.masks import gate_keep, prob_gate_keep, z_keep
from pipeline.infer.step_base import (
    RAW_THRESHOLD,
    Axis,
    ClassInput,
    ClassParams,
    ComponentStep,
    CountGateStep,
    RelativeComponentStep,
    SliceStep,
    Step,
    StepError,
    StepValue,
    ThresholdStep,
    Variant,
    field_types,
    final_mask,
    run_steps,
)

# --------------------------------------------------------------------------- the five steps


def _gate(mask: np.ndarray, x: ClassInput, value: StepValue) -> np.ndarray | None:
    return gate_keep(x.gate, float(value), len(mask))


def _prob_gate(mask: np.ndarray, x: ClassInput, value: StepValue) -> np.ndarray | None:
    pixels, threshold = value
    return prob_gate_keep(x.probs, int(pixels), float(threshold))


def _z_run(mask: np.ndarray, x: ClassInput, value: StepValue) -> np.ndarray | None:
    return z_keep(mask, int(value))


PIXEL_THRESHOLD = ThresholdStep(
    name="pixel_threshold",
    fields=("pixel_threshold",),
    grid_keys=("pixel_thresholds",),
    label="+ tuned pixel threshold",
    title="pixel threshold",
    start=RAW_THRESHOLD,
    low_edge=True,
)
GATE = SliceStep(
    name="gate_threshold",
    fields=("gate_threshold",),
    grid_keys=("gate_thresholds",),
    label="+ classifier gate",
    title="classifier gate threshold",
    start=0.0,
    off_upto=0.0,
    needs_classifier=True,
    keep=_gate,
)
PROB_GATE = CountGateStep(
    name="prob_gate",
    fields=("prob_gate_pixels", "prob_gate_level"),
    grid_keys=("prob_gate_pixels", "prob_gate_levels"),
    label="+ probability gate (> N pixels at p >= t)",
    title="probability gate: more than N pixels at p >= t",
    start=(0, 0.0),
    off=(0, 0.0),
    off_upto=0,
    canonical_off=True,
    axis=Axis.PAIRS,
    symbols=("N", "t"),
    keep=_prob_gate,
)
Z_RUN = SliceStep(
    name="z_run",
    fields=("z_run",),
    grid_keys=("z_runs",),
    label="+ z-continuity (k consecutive slices)",
    title="z-continuity run k (slices)",
    start=0,
    off=0,
    off_upto=1,
    volumetric_only=True,
    axis=Axis.CATEGORICAL,
    keep=_z_run,
)
MIN_COMPONENT_SIZE = ComponentStep(
    name="min_component_size",
    fields=("min_component_size",),
    grid_keys=("min_component_sizes",),
    label="+ small-component removal",
    title="minimum component size (voxels)",
    start=0,
    off_upto=1,
    axis=Axis.CATEGORICAL,
)

COMPONENT_FRACTION = RelativeComponentStep(
    name="component_fraction",
    fields=("component_fraction",),
    grid_keys=("component_fractions",),
    label="+ components small next to the largest removed",
    title="kept components: at least this share of the largest",
    start=0.0,
    off=0.0,
    off_upto=0.0,
)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Registry:
    """The steps in the order they apply, and the parameter record whose fields they set.

    Checked when built: unique names, a threshold step first and only there, every field of
    ``params`` set by exactly one step, and grid keys that ``TuneCfg`` has.
    """

    steps: tuple[Step, ...]
    params: type[ClassParams] = ClassParams

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise StepError(f"step names must be unique, got {names}")
        kinds = [isinstance(s, ThresholdStep) for s in self.steps]
        if not kinds or not kinds[0] or any(kinds[1:]):
            raise StepError(f"the first step, and only it, must be a ThresholdStep: {names}")
        owned = [f for s in self.steps for f in s.fields]
        declared = [f.name for f in dataclasses.fields(self.params)]
        if sorted(owned) != sorted(declared):
            raise StepError(f"the steps set fields {owned} but {self.params.__name__} has {declared}")
        tune_keys = {f.name for f in dataclasses.fields(TuneCfg)}
        unknown = [k for s in self.steps for k in s.grid_keys if k not in tune_keys]
        if unknown:
            raise StepError(f"grid keys {unknown} are not TuneCfg keys")

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def index(self, name: str) -> int:
        if name not in self.names():
            raise StepError(f"unknown post-processing step '{name}' (expected one of {self.names()})")
        return self.names().index(name)

    def named(self, name: str) -> Step:
        return self.steps[self.index(name)]

    def raw(self) -> ClassParams:
        """The start of every search: each step at its ``start`` value."""
        values = {f: v for s in self.steps for f, v in zip(s.fields, s.cast(s.start, self.params))}
        return self.params(**values)

    def candidates(self, step: Step, tune: TuneCfg) -> list[StepValue]:
        return step.candidates(tune, self.params)

    def int_fields(self) -> list[str]:
        """The integer fields of the parameter record (tables show them as integers)."""
        return [name for name, tp in field_types(self.params).items() if tp is int]

    def apply(self, x: ClassInput, params: ClassParams) -> np.ndarray:
        """One class's (S, H, W) bool mask: every step in order."""
        return final_mask(run_steps(self.steps, None, x, params))

    def variants(
        self, x: ClassInput, base: ClassParams, step: Step, values: Sequence[StepValue]
    ) -> Iterator[Variant]:
        """``(key, mask)`` for each value of one step, the steps before it run once (see :meth:`Step.variants`)."""
        i = self.index(step.name)
        before = run_steps(self.steps[:i], None, x, base)
        return step.variants(before, x, base, values, self.steps[i + 1 :])

    def needs_classifier(self, params: Sequence[ClassParams]) -> bool:
        """Whether some class uses a step that reads the classifier."""
        return any(s.needs_classifier and not s.is_off(s.get(p)) for s in self.steps for p in params)


REGISTRY = Registry((PIXEL_THRESHOLD, GATE, PROB_GATE, Z_RUN, MIN_COMPONENT_SIZE, COMPONENT_FRACTION))


def registry() -> Registry:
    """The registry in use (read at call time, so a test may swap in one with a toy step)."""
    return REGISTRY


def setting(params: ClassParams, step: str) -> StepValue:
    """The value of one step (by name) in ``params``: a field, or a tuple for a step of several fields."""
    return registry().named(step).get(params)


def with_value(params: ClassParams, step: str, value: StepValue) -> ClassParams:
    """A copy of ``params`` with one step (by name) set to ``value``."""
    return registry().named(step).set(params, value)
