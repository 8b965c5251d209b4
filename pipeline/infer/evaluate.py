"""Scoring blends and post-processing variants on out-of-fold predictions: the inner loop of ``make tune``.

Every figure is the dataset's own metric (``DatasetSpec.fast_stats`` / ``volume_stats`` per
volume, summed by ``aggregate``). A pass evaluates every candidate of one (class, stage) on a
volume while that volume is in memory (uint8 probabilities, memory-mapped), so a tuning step reads
the OOF once per class; volumes run on a thread pool (the metric kernels release the GIL).

Candidates share work (:func:`class_variants`): the slice stages (classifier gate, probability
gate, z-continuity) threshold once and only re-run what follows them; the size step labels once.
Two candidates that leave the same mask (the same non-empty slices kept, the same number of
components kept) are scored once.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.infer.ensemble import OOFSet, blend_uint8
from pipeline.infer.postprocess import (
    SLICE_STAGES,
    ClassParams,
    Components,
    apply_class,
    apply_postprocess,
    empty_slices,
    remove_small_components,
    slice_keep,
    threshold_probs,
)
from pipeline.runtime import available_cores

log = logging.getLogger(__name__)

Vary = tuple[int, str, list[Any]]  # (class index, stage of STAGES or "weights", candidate values)
Setting = tuple[np.ndarray, list[ClassParams]]  # (classes, members) blend weights, per-class params


def default_workers() -> int:
    """Worker threads for tuning and reports: the cores this process may use, at most 8."""
    return min(8, available_cores())


def metric_values(result: dict) -> dict[str, float]:
    """The scalar figures of a metric dict (``score`` and the dataset's other means), no counts."""
    return {k: v for k, v in result.items() if isinstance(v, float)}


def class_variants(
    probs_u8: np.ndarray,
    gate: np.ndarray | None,
    base: ClassParams,
    stage: str,
    values: list[Any],
    volumetric: bool = True,
) -> Iterator[tuple[Hashable | None, np.ndarray | None]]:
    """``(key, mask)``: one class's (S, H, W) mask for each value of ``stage`` (the rest from ``base``).

    ``key`` names the mask for reuse (None: never reused); a value whose mask an earlier one
    already gave yields ``(key, None)``. The pixel step re-runs everything; a slice stage (gate,
    probability gate, z-continuity) thresholds and applies the stages before it once; the size
    step labels components once.
    """
    if stage == "pixel_threshold":
        for v in values:
            yield None, apply_class(probs_u8, gate, base.with_value(stage, v), volumetric)
        return
    seen: set[Hashable] = set()
    if stage == "min_component_size":
        mask = apply_class(probs_u8, gate, base.with_value(stage, 0), volumetric)
        components = Components.of(mask, volumetric)
        for v in values:
            key = components.n_kept(int(v))
            if key in seen:
                yield key, None
                continue
            seen.add(key)
            yield key, mask if v <= 1 else components.keep(int(v))
        return
    if stage not in SLICE_STAGES:
        raise ValueError(f"unknown post-processing stage '{stage}'")
    i = SLICE_STAGES.index(stage)
    pre = threshold_probs(probs_u8, base.pixel_threshold)
    for earlier in SLICE_STAGES[:i]:
        empty_slices(pre, slice_keep(earlier, pre, probs_u8, gate, base, volumetric))
    occupied = pre.reshape(len(pre), -1).any(axis=1)
    for v in values:
        params = base.with_value(stage, v)
        keep = slice_keep(stage, pre, probs_u8, gate, params, volumetric)
        key = (occupied if keep is None else occupied & keep).tobytes()  # the non-empty slices left
        if key in seen:
            yield key, None
            continue
        seen.add(key)
        mask = empty_slices(pre.copy(), keep)
        for later in SLICE_STAGES[i + 1 :]:
            empty_slices(mask, slice_keep(later, mask, probs_u8, gate, params, volumetric))
        yield key, remove_small_components(mask, params.min_component_size, volumetric)


def day_stats(
    oof: OOFSet,
    day: str,
    weight_list: list[np.ndarray],
    params: list[ClassParams],
    vary: Vary | None = None,
    per_class: bool = False,
) -> list[Any]:
    """The dataset's stats of one volume for every (weights, candidate) variant, weights-major.

    ``vary = (c, "weights", [w, ...])`` tries (members,) blend weights for class ``c`` alone.
    """
    spec = oof.spec
    stats = spec.volume_stats if per_class else spec.fast_stats
    probs = oof.member_probs(day)
    gate = oof.gate(day)
    truth = np.asarray(oof.truth_mask(day))
    out = []
    for weights in weight_list:
        q = blend_uint8(probs, weights)
        mask = apply_postprocess(q, gate, params, spec.volumetric)
        if vary is None:
            out.append(stats(mask, truth))
            continue
        c, stage, values = vary
        gate_c = None if gate is None else gate[:, c]
        if stage == "weights":
            class_probs = [np.ascontiguousarray(p[:, c]) for p in probs]
            variants: Iterator = (
                (None, apply_class(blend_uint8(class_probs, w), gate_c, params[c], spec.volumetric))
                for w in values
            )
        else:
            variants = class_variants(q[:, c], gate_c, params[c], stage, values, spec.volumetric)
        scored: dict[Hashable, Any] = {}
        for key, variant in variants:
            if variant is None:
                out.append(scored[key])
                continue
            mask[:, c] = variant
            out.append(stats(mask, truth))
            if key is not None:
                scored[key] = out[-1]
    return out


def _map_days(oof: OOFSet, one, days: list[str], workers: int, desc: str, progress: bool) -> list[list[Any]]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(one, days), total=len(days), desc=desc, unit="day", disable=not progress))


def evaluate(
    oof: OOFSet,
    weight_list: list[np.ndarray],
    params: list[ClassParams],
    vary: Vary | None = None,
    *,
    days: list[str] | None = None,
    per_class: bool = False,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[dict]:
    """The dataset's score dict (``spec.aggregate``) of every variant over ``days`` (default: every OOF volume)."""
    days = oof.days if days is None else days
    per_day = _map_days(
        oof, lambda d: day_stats(oof, d, weight_list, params, vary, per_class), days, workers, desc, progress
    )
    n_variants = len(per_day[0])
    return [oof.spec.aggregate([stats[i] for stats in per_day]) for i in range(n_variants)]


def evaluate_settings(
    oof: OOFSet,
    settings: list[Setting],
    days: list[str],
    *,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[dict]:
    """The score dict of each (weights, params) setting over ``days``, in one pass (repeats scored once)."""
    if not settings:
        return []
    keys = [(np.asarray(w, np.float64).tobytes(), tuple(p)) for w, p in settings]

    def one(day: str) -> list[Any]:
        probs, gate = oof.member_probs(day), oof.gate(day)
        truth = np.asarray(oof.truth_mask(day))
        blends: dict[bytes, np.ndarray] = {}
        scored: dict[tuple, Any] = {}
        for key, (weights, params) in zip(keys, settings):
            if key not in scored:
                if key[0] not in blends:
                    blends[key[0]] = blend_uint8(probs, weights)
                mask = apply_postprocess(blends[key[0]], gate, params, oof.spec.volumetric)
                scored[key] = oof.spec.fast_stats(mask, truth)
        return [scored[k] for k in keys]

    per_day = _map_days(oof, one, days, workers, desc, progress)
    return [oof.spec.aggregate([stats[i] for stats in per_day]) for i in range(len(settings))]
