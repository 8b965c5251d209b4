"""The parameter record of the post-processing steps and the contract a step fulfils, with its three kinds.

:class:`ClassParams` holds one class's settings (the fields the steps set, in the order of
``postprocess.json``). A :class:`Step` says what it stores there (``fields``), where its candidates
come from (``grid_keys`` of :class:`~pipeline.config.TuneCfg`), how it changes a mask
(:meth:`Step.apply`), how the search tries its candidates sharing work (:meth:`Step.variants`), its
"off" value, whether it needs volumes or a classifier, and how ``make cv`` draws it:

- :class:`ThresholdStep` makes the mask from the blended uint8 probabilities;
- :class:`SliceStep` empties whole slices (:class:`CountGateStep`: by pixels at a probability level);
- :class:`ComponentStep` removes small connected components;
- :class:`RelativeComponentStep` removes components small next to the largest.

The records themselves, in order, are :mod:`pipeline.infer.steps`.
"""

from __future__ import annotations

import functools
import itertools
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import numpy as np

from pipeline.config import TuneCfg
from pipeline.infer.masks import (
    Components,
    empty_slices,
    keep_large_components,
    prob_level,
    remove_small_components,
    threshold_probs,
)

StepValue = Any  # one step's setting: a number, or a tuple of numbers for a step of several fields
Variant = tuple[Hashable | None, np.ndarray | None]  # (key naming the mask for reuse, mask or None: seen)
RAW_THRESHOLD = 0.5  # the plain sigmoid cut: the "raw" start every tuned step is measured against


@dataclass(frozen=True)
class ClassParams:
    """What turns one class's probabilities into its mask: the fields the steps set (one or more each).

    The steps are :data:`pipeline.infer.steps.REGISTRY`; the field order is the one of ``postprocess.json`` (format 2); the fields added in format 2
    default to "off", which is what a format-1 file meant.
    """

    pixel_threshold: float
    gate_threshold: float
    min_component_size: int
    prob_gate_pixels: int = 0  # N: keep a slice only if more than N pixels have q >= level; 0 = off
    prob_gate_level: float = 0.0  # t of the probability gate (unused while N = 0)
    z_run: int = 0  # k: z-continuity from runs of >= k non-empty slices; <= 1 = off
    component_fraction: float = 0.0  # f: components below f x the largest removed; 0 = off


@dataclass(frozen=True)
class ClassInput:
    """What the steps read for one class of one volume besides the mask so far."""

    probs: np.ndarray  # (S, H, W) uint8 blended probabilities
    gate: np.ndarray | None  # (S,) classifier probabilities; None without a classifier
    volumetric: bool = True  # slices form a volume (z-continuity, 3D components)


class Axis(Enum):
    """How ``make cv`` draws a step's score curve."""

    LINEAR = "linear"  # values on a number line (thresholds)
    CATEGORICAL = "categorical"  # evenly spaced ticks: values span decades, or are few integers
    PAIRS = "pairs"  # (N, t): one line per t against N, "off" dashed


_FIELD_TYPES: dict[type, dict[str, Callable[[Any], Any]]] = {}


def field_types(params: type) -> dict[str, Callable[[Any], Any]]:
    """Field name -> type (the cast of a value) of a parameter record, looked up once per record."""
    if params not in _FIELD_TYPES:
        _FIELD_TYPES[params] = dict(typing.get_type_hints(params))
    return _FIELD_TYPES[params]


class StepError(ValueError):
    """A step name that is not registered, or a registry that does not fit its parameter record."""


@dataclass(frozen=True, kw_only=True)
class Step(ABC):
    """One post-processing step (see the module doc); a subclass says how it changes a mask."""

    name: str  # its name in postprocess.json (steps, curves, grids) and its figure's file name
    fields: tuple[str, ...]  # the ClassParams fields it sets; a value is a tuple when there are several
    grid_keys: tuple[str, ...]  # the TuneCfg keys of its candidates (several: their product)
    label: str  # its row in the steps table
    title: str  # its figure's axis
    start: StepValue  # the raw setting every search starts from
    off: StepValue | None = None  # an "off" value that is always a candidate (None: the grid alone)
    off_upto: float | None = None  # values whose first number is at most this change nothing
    canonical_off: bool = False  # store every off value as ``off`` (its other numbers mean nothing then)
    volumetric_only: bool = False  # needs slices that form a volume (skipped on 2D images)
    needs_classifier: bool = False  # reads the classifier's slice probabilities
    axis: Axis = Axis.LINEAR
    symbols: tuple[str, ...] = ()  # names of a tuple value's numbers in figures ("N", "t")
    low_edge: bool = False  # also warn when the smallest candidate is chosen

    # ----------------------------------------------------------------- the setting in ClassParams

    def get(self, params: ClassParams) -> StepValue:
        values = tuple(getattr(params, f) for f in self.fields)
        return values[0] if len(values) == 1 else values

    def set(self, params: ClassParams, value: StepValue) -> ClassParams:
        """A copy of ``params`` with this step at ``value`` (cast to the fields' types)."""
        items = self.cast(value, type(params))
        if self.canonical_off and self.is_off(self._plain(items)):
            items = self.cast(self.off, type(params))
        return replace(params, **dict(zip(self.fields, items)))

    def cast(self, value: StepValue, params: type = ClassParams) -> tuple[Any, ...]:
        items = tuple(value) if len(self.fields) > 1 else (value,)
        types = field_types(params)
        return tuple(types[f](v) for f, v in zip(self.fields, items, strict=True))

    def is_off(self, value: StepValue) -> bool:
        return self.off_upto is not None and float(np.atleast_1d(value)[0]) <= self.off_upto

    def candidates(self, tune: TuneCfg, params: type = ClassParams) -> list[StepValue]:
        """The values the search tries, from ``tune`` (the "off" value first where there is one)."""
        grids = [getattr(tune, key) for key in self.grid_keys]
        raw = grids[0] if len(grids) == 1 else list(itertools.product(*grids))
        values = [self._plain(self.cast(v, params)) for v in raw]
        if self.off is None:
            return values
        return [self.off, *(v for v in values if not self.is_off(v))]

    def _plain(self, items: tuple[Any, ...]) -> StepValue:
        return items[0] if len(items) == 1 else items

    def describe(self, value: StepValue) -> str:
        """A value in words for figures: "off", ``0.45`` or ``N = 12, t = 0.6``."""
        if self.off is not None and self.is_off(value):
            return "off"
        if self.symbols:
            return ", ".join(f"{s} = {v:g}" for s, v in zip(self.symbols, value))
        return f"{value:g}"

    def checked(self, x: ClassInput, params: ClassParams) -> StepValue:
        """This step's value in ``params``; a step that needs volumes refuses to run on 2D images."""
        value = self.get(params)
        if self.volumetric_only and not x.volumetric and not self.is_off(value):
            raise ValueError(
                f"{self.name} = {value}: {self.title} needs volumes, but this dataset's images are 2D; "
                f"set tune.{self.grid_keys[0]}: [{self.off}] and rerun `make tune`"
            )
        return value

    def levels(self, params: ClassParams) -> list[float]:
        """The probability thresholds this step compares with (a volume is cut to its box only when all
        of them keep no voxel of probability 0)."""
        return []

    # ----------------------------------------------------------------- what the step does

    @abstractmethod
    def apply(self, mask: np.ndarray | None, x: ClassInput, params: ClassParams) -> np.ndarray:
        """The (S, H, W) bool mask after this step (``mask``: after the steps before; may change in place)."""

    @abstractmethod
    def variants(
        self,
        before: np.ndarray | None,
        x: ClassInput,
        base: ClassParams,
        values: Sequence[StepValue],
        after: Sequence[Step],
    ) -> Iterator[Variant]:
        """``(key, mask)`` of the final mask for each value (the other steps from ``base``), sharing work.

        ``before`` is the mask after the earlier steps (None for the first step), ``after`` the
        steps that follow. A value whose mask an earlier one gave yields ``(key, None)``.
        """


def run_steps(
    steps: Sequence[Step], mask: np.ndarray | None, x: ClassInput, params: ClassParams
) -> np.ndarray | None:
    """``mask`` through ``steps`` in order (the loop of nnU-Net's post-processing, with records)."""
    for step in steps:
        mask = step.apply(mask, x, params)
    return mask


def _mask(mask: np.ndarray | None, step: Step) -> np.ndarray:
    if mask is None:
        raise StepError(f"step '{step.name}' needs a mask: a threshold step must come first")
    return mask


def once_per_key(items: Iterable[tuple[Hashable, Callable[[], np.ndarray]]]) -> Iterator[Variant]:
    """``(key, mask)`` per item, the mask made only the first time its key comes (later: ``(key, None)``)."""
    seen: set[Hashable] = set()
    for key, make in items:
        if key in seen:
            yield key, None
            continue
        seen.add(key)
        yield key, make()


def final_mask(mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        raise StepError("the steps made no mask: the registry must start with a threshold step")
    return mask


@dataclass(frozen=True, kw_only=True)
class ThresholdStep(Step):
    """Makes the mask: a pixel is foreground when its uint8 probability ``q >= round(t * 255)``."""

    def apply(self, mask: np.ndarray | None, x: ClassInput, params: ClassParams) -> np.ndarray:
        return threshold_probs(x.probs, float(self.checked(x, params)))

    def levels(self, params: ClassParams) -> list[float]:
        return [float(self.get(params))]

    def variants(
        self,
        before: np.ndarray | None,
        x: ClassInput,
        base: ClassParams,
        values: Sequence[StepValue],
        after: Sequence[Step],
    ) -> Iterator[Variant]:
        for value in values:  # every later step sees another mask: nothing to share
            params = self.set(base, value)
            yield None, final_mask(run_steps(after, self.apply(before, x, params), x, params))


KeepFn = Callable[[np.ndarray, ClassInput, StepValue], np.ndarray | None]


@dataclass(frozen=True, kw_only=True)
class SliceStep(Step):
    """Empties whole slices: ``keep(mask, x, value)`` gives the (S,) slices kept (None: every slice).

    Candidates share the mask of the steps before; two that keep the same non-empty slices give
    the same mask and are scored once.
    """

    keep: KeepFn

    def kept(self, mask: np.ndarray, x: ClassInput, params: ClassParams) -> np.ndarray | None:
        return self.keep(mask, x, self.checked(x, params))

    def apply(self, mask: np.ndarray | None, x: ClassInput, params: ClassParams) -> np.ndarray:
        mask = _mask(mask, self)
        return empty_slices(mask, self.kept(mask, x, params))

    def keeper(self, before: np.ndarray, x: ClassInput) -> Callable[[ClassParams], np.ndarray | None]:
        """The kept slices of ``before`` for each candidate's params (a kind may cache shared work)."""
        return lambda params: self.kept(before, x, params)

    def variants(
        self,
        before: np.ndarray | None,
        x: ClassInput,
        base: ClassParams,
        values: Sequence[StepValue],
        after: Sequence[Step],
    ) -> Iterator[Variant]:
        before = _mask(before, self)
        occupied = before.reshape(len(before), -1).any(axis=1)
        keep_of = self.keeper(before, x)

        def make(params: ClassParams, keep: np.ndarray | None) -> np.ndarray:
            return final_mask(run_steps(after, empty_slices(before.copy(), keep), x, params))

        def keyed() -> Iterator[tuple[Hashable, Callable[[], np.ndarray]]]:
            for value in values:
                params = self.set(base, value)
                keep = keep_of(params)
                key = (occupied if keep is None else occupied & keep).tobytes()  # the non-empty slices left
                yield key, functools.partial(make, params, keep)

        return once_per_key(keyed())


@dataclass(frozen=True, kw_only=True)
class CountGateStep(SliceStep):
    """A slice gate on the blended probability: keep a slice with more than N pixels at ``q >= t``.

    ``value = (N, t)``; the search counts the pixels at each level once per volume and class.
    """

    def keeper(self, before: np.ndarray, x: ClassInput) -> Callable[[ClassParams], np.ndarray | None]:
        counts: dict[int, np.ndarray] = {}
        flat = x.probs.reshape(len(x.probs), -1)

        def keep(params: ClassParams) -> np.ndarray | None:
            pixels, threshold = self.get(params)
            if pixels <= 0:
                return None
            level = prob_level(threshold)
            if level not in counts:
                counts[level] = np.count_nonzero(flat >= level, axis=1)
            return counts[level] > pixels

        return keep

    def levels(self, params: ClassParams) -> list[float]:
        pixels, threshold = self.get(params)
        return [float(threshold)] if pixels > 0 else []


@dataclass(frozen=True, kw_only=True)
class _ComponentsStep(Step):
    """A step that keeps some connected components (3D 26-connected, or 2D per image): candidates label
    the components once and share a mask wherever they keep the same components."""

    def kept(self, components: Components, value: StepValue, x: ClassInput) -> np.ndarray:
        """(labels,) bool: the components ``value`` keeps."""
        raise NotImplementedError

    def key(self, components: Components, value: StepValue, kept: np.ndarray | None) -> Hashable:
        """Equal keys mean equal masks (``kept``: what ``value`` keeps; None when it is off)."""
        return "off" if kept is None else int(np.count_nonzero(kept))

    def variants(
        self,
        before: np.ndarray | None,
        x: ClassInput,
        base: ClassParams,
        values: Sequence[StepValue],
        after: Sequence[Step],
    ) -> Iterator[Variant]:
        before = _mask(before, self)
        components = Components.of(before, x.volumetric)
        kept = {v: self.kept(components, v, x) for v in values if not self.is_off(v)}

        def make(value: StepValue) -> np.ndarray:
            mask = before if self.is_off(value) else components.keep_labels(kept[value])
            return final_mask(run_steps(after, mask, x, self.set(base, value)))

        return once_per_key(
            (self.key(components, v, kept.get(v)), functools.partial(make, v)) for v in values
        )


@dataclass(frozen=True, kw_only=True)
class ComponentStep(_ComponentsStep):
    """Removes connected components smaller than the value (sizes only rise, so equal kept counts mean
    equal masks, "off" included)."""

    def apply(self, mask: np.ndarray | None, x: ClassInput, params: ClassParams) -> np.ndarray:
        return remove_small_components(_mask(mask, self), int(self.checked(x, params)), x.volumetric)

    def kept(self, components: Components, value: StepValue, x: ClassInput) -> np.ndarray:
        return components.kept_min_size(int(value))

    def key(self, components: Components, value: StepValue, kept: np.ndarray | None) -> Hashable:
        return components.n_kept(int(value))


@dataclass(frozen=True, kw_only=True)
class RelativeComponentStep(_ComponentsStep):
    """Removes connected components smaller than the value times the largest one (the volume's largest
    in 3D, each image's own in 2D): 1 keeps the largest only (one tumour, one nerve)."""

    def apply(self, mask: np.ndarray | None, x: ClassInput, params: ClassParams) -> np.ndarray:
        return keep_large_components(_mask(mask, self), float(self.checked(x, params)), x.volumetric)

    def kept(self, components: Components, value: StepValue, x: ClassInput) -> np.ndarray:
        return components.kept_relative(float(value), x.volumetric)
