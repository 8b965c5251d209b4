"""Scoring blends and post-processing variants on out-of-fold predictions: the inner loop of ``make tune``.

Every figure is the dataset's own metric (``DatasetSpec.fast_stats`` / ``volume_stats`` per
volume, summed by ``aggregate``). A pass evaluates every candidate of one (class, stage) on a
volume while that volume is in memory (:class:`DayWork`), so a tuning step reads the OOF once per
class; volumes run on a thread pool (the kernels release the GIL). Work shared in a pass:

- the volume is cut to the box of its members' non-zero probabilities and its truth
  (:meth:`OOFSet.view`, where the dataset's metric allows it, ``cuts_to_box``): no threshold above
  0 keeps a voxel outside, and the metric is scaled by the uncut grid, so the scores are exact;
  on the synthetic full set the box is about a quarter of the volume;
- the truth is digested once (``DatasetSpec.reference``: its runs) and each weight vector blended once;
- several searches share a pass (:func:`evaluate_jobs`): the held-apart estimate's search on the
  tuning part scores its candidates beside the search on every volume, and where both hold the
  same settings (most steps) a day is scored once for both.

Candidates share work (:func:`class_variants`): the slice stages (classifier gate, probability
gate, z-continuity) threshold once and only re-run what follows them; the size step labels once.
Two candidates that leave the same mask (the same non-empty slices kept, the same number of
components kept) are scored once.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    prob_level,
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
    counts: dict[int, np.ndarray] = {}  # probability gate: pixels at each level per slice, counted once

    def keep_of(params: ClassParams) -> np.ndarray | None:
        if stage != "prob_gate" or params.prob_gate_pixels <= 0:
            return slice_keep(stage, pre, probs_u8, gate, params, volumetric)
        level = prob_level(params.prob_gate_level)
        if level not in counts:
            counts[level] = np.count_nonzero(probs_u8.reshape(len(probs_u8), -1) >= level, axis=1)
        return counts[level] > params.prob_gate_pixels

    for v in values:
        params = base.with_value(stage, v)
        keep = keep_of(params)
        key = (occupied if keep is None else occupied & keep).tobytes()  # the non-empty slices left
        if key in seen:
            yield key, None
            continue
        seen.add(key)
        mask = empty_slices(pre.copy(), keep)
        for later in SLICE_STAGES[i + 1 :]:
            empty_slices(mask, slice_keep(later, mask, probs_u8, gate, params, volumetric))
        yield key, remove_small_components(mask, params.min_component_size, volumetric)


class DayWork:
    """One OOF day in memory during a pass: its (cut) view, the truth digested once, blends by weights."""

    def __init__(self, oof: OOFSet, day: str, cut: bool = True, per_class: bool = False) -> None:
        self.spec = oof.spec
        self.per_class = per_class
        self.view = oof.view(day, cut=cut and not per_class)  # per-class stats take whole volumes
        self.truth = self.view.truth if per_class else self.spec.reference(self.view.truth)
        self._blends: dict[bytes, np.ndarray] = {}

    def blend(self, weights: np.ndarray) -> np.ndarray:
        key = np.asarray(weights, np.float64).tobytes() + bytes(str(np.shape(weights)), "ascii")
        if key not in self._blends:
            self._blends[key] = blend_uint8(self.view.probs, weights)
        return self._blends[key]

    def stats(self, mask: np.ndarray) -> Any:
        if self.per_class:
            return self.spec.volume_stats(mask, self.truth)
        grid = self.view.grid if self.spec.cuts_to_box else None
        return self.spec.fast_stats(mask, self.truth, grid)


def day_stats(
    work: DayWork, weight_list: list[np.ndarray], params: list[ClassParams], vary: Vary | None = None
) -> list[Any]:
    """The dataset's stats of one volume for every (weights, candidate) variant, weights-major.

    ``vary = (c, "weights", [w, ...])`` tries (members,) blend weights for class ``c`` alone.
    """
    view, volumetric = work.view, work.spec.volumetric
    out = []
    for weights in weight_list:
        q = work.blend(weights)
        if vary is None:
            out.append(work.stats(apply_postprocess(q, view.gate, params, volumetric)))
            continue
        c, stage, values = vary
        mask = np.zeros(q.shape, dtype=bool)  # class c is set by each variant below
        for k, p in enumerate(params):
            if k != c:
                mask[:, k] = apply_class(
                    q[:, k], None if view.gate is None else view.gate[:, k], p, volumetric
                )
        gate_c = None if view.gate is None else view.gate[:, c]
        if stage == "weights":
            class_probs = [np.ascontiguousarray(p[:, c]) for p in view.probs]
            variants: Iterator = (
                (None, apply_class(blend_uint8(class_probs, w), gate_c, params[c], volumetric))
                for w in values
            )
        else:
            variants = class_variants(q[:, c], gate_c, params[c], stage, values, volumetric)
        scored: dict[Hashable, Any] = {}
        for key, variant in variants:
            if variant is None:
                out.append(scored[key])
                continue
            mask[:, c] = variant
            out.append(work.stats(mask))
            if key is not None:
                scored[key] = out[-1]
    return out


def can_cut(params: list[ClassParams], vary: Vary | None = None) -> bool:
    """Whether every threshold in play keeps no voxel of probability 0 (so a day may be cut to its box)."""
    levels = [p.pixel_threshold for p in params] + [
        p.prob_gate_level for p in params if p.prob_gate_pixels > 0
    ]
    if vary is not None and vary[1] == "pixel_threshold":
        levels += [float(v) for v in vary[2]]
    if vary is not None and vary[1] == "prob_gate":
        levels += [float(t) for n, t in vary[2] if n > 0]
    return min((prob_level(t) for t in levels), default=1) >= 1


@dataclass(frozen=True)
class Job:
    """Variants to score over some days: ``weight_list`` x the candidates of ``vary`` (see :func:`day_stats`)."""

    days: frozenset[str]
    weight_list: list[np.ndarray]
    params: list[ClassParams]
    vary: Vary | None = None

    def key(self) -> tuple:
        """Equal keys score equal variants: a day both jobs cover is scored once."""
        vary = None
        if self.vary is not None:
            c, stage, values = self.vary
            vary = (c, stage, tuple(np.asarray(v, np.float64).tobytes() for v in values))
        return (
            tuple(np.asarray(w, np.float64).tobytes() for w in self.weight_list),
            tuple(self.params),
            vary,
        )


def _map_days(oof: OOFSet, one, days: list[str], workers: int, desc: str, progress: bool) -> list[list[Any]]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(one, days), total=len(days), desc=desc, unit="day", disable=not progress))


def evaluate_jobs(
    oof: OOFSet,
    jobs: list[Job],
    *,
    per_class: bool = False,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[list[dict]]:
    """Each job's score dicts (``spec.aggregate`` over its days), every day read and blended once.

    Jobs of several searches over overlapping days (a search on every volume and one on the tuning
    part) share the pass: a day holds one view and one blend per weight vector, and jobs with equal
    settings are scored once on the days they share.
    """
    days = [d for d in oof.days if any(d in j.days for j in jobs)]
    keys = [j.key() for j in jobs]
    cut = all(can_cut(j.params, j.vary) for j in jobs)

    def one(day: str) -> list[list[Any] | None]:
        work = DayWork(oof, day, cut, per_class)
        done: dict[tuple, list[Any]] = {}
        out: list[list[Any] | None] = []
        for job, key in zip(jobs, keys):
            if day not in job.days:
                out.append(None)
                continue
            if key not in done:
                done[key] = day_stats(work, job.weight_list, job.params, job.vary)
            out.append(done[key])
        return out

    per_day = _map_days(oof, one, days, workers, desc, progress)
    results = []
    for j in range(len(jobs)):
        rows = [row[j] for row in per_day if row[j] is not None]
        results.append([oof.spec.aggregate([r[i] for r in rows]) for i in range(len(rows[0]))])
    return results


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
    job = Job(frozenset(oof.days if days is None else days), list(weight_list), list(params), vary)
    return evaluate_jobs(oof, [job], per_class=per_class, workers=workers, desc=desc, progress=progress)[0]


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
    day_set = frozenset(days)
    jobs = [Job(day_set, [np.asarray(w)], list(p)) for w, p in settings]
    results = evaluate_jobs(oof, jobs, workers=workers, desc=desc, progress=progress)
    return [r[0] for r in results]
