"""Scoring blends and post-processing variants on out-of-fold predictions: the inner loop of ``make tune``.

Every figure is the dataset's own metric (``DatasetSpec.fast_stats`` / ``volume_stats`` per
volume, summed by ``aggregate``). A pass evaluates every candidate of one (class, step) on a
volume while that volume is in memory (:class:`VolumeWork`), so a tuning step reads the OOF once per
class; volumes run on a thread pool (the kernels release the GIL). Work shared in a pass:

- the volume is cut to the box of its members' non-zero probabilities and its truth
  (:meth:`OOFSet.view`, where the dataset's metric allows it, ``cuts_to_box``): no threshold above
  0 keeps a voxel outside, and the metric is scaled by the uncut grid, so the scores are exact;
  on the synthetic full set the box is about a quarter of the volume;
- the truth is digested once (``DatasetSpec.reference``: its runs) and each weight vector blended once;
- several searches share a pass (:func:`evaluate_jobs`): the held-apart estimate's search on the
  tuning part scores its candidates beside the search on every volume, and where both hold the
  same settings (most steps) a volume is scored once for both.

Candidates share work (:func:`class_variants`, each step's kind says how): the slice steps
(classifier gate, probability gate, z-continuity) threshold once and only re-run what follows them;
the size step labels once.
Two candidates that leave the same mask (the same non-empty slices kept, the same number of
components kept) are scored once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from pipeline.infer.ensemble import OOFSet, blend_uint8
from pipeline.infer.masks import prob_level
from pipeline.infer.postprocess import apply_class, apply_postprocess
from pipeline.infer.step_base import ClassInput, ClassParams, StepValue, Variant
from pipeline.infer.steps import registry
from pipeline.runtime import available_cores

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    step: str,
    values: Sequence[StepValue],
    volumetric: bool = True,
) -> Iterator[Variant]:
    """``(key, mask)``: one class's (S, H, W) mask for each value of one step (the rest from ``base``).

    ``key`` names the mask for reuse (None: never reused); a value whose mask an earlier one
    already gave yields ``(key, None)``. The steps before ``step`` run once; how its candidates
    share the rest is the step's own (:meth:`~pipeline.infer.step_base.Step.variants`).
    """
    steps = registry()
    return steps.variants(ClassInput(probs_u8, gate, volumetric), base, steps.named(step), values)


@dataclass(frozen=True, eq=False)
class VaryStep:
    """The candidate values of one post-processing step for one class, every other setting held."""

    cls: int  # class index
    step: str  # a step of the registry
    values: list[StepValue]

    def key(self) -> tuple:
        return ("step", self.cls, self.step, tuple(np.asarray(v, np.float64).tobytes() for v in self.values))


@dataclass(frozen=True, eq=False)
class VaryWeights:
    """Candidate (members,) blend weight vectors for one class, every other setting held."""

    cls: int  # class index
    values: list[np.ndarray]

    def key(self) -> tuple:
        return ("weights", self.cls, tuple(np.asarray(v, np.float64).tobytes() for v in self.values))


Vary = VaryStep | VaryWeights


class VolumeWork:
    """One OOF volume in memory during a pass: its (cut) view, the truth digested once, blends by weights."""

    def __init__(self, oof: OOFSet, volume: str, cut: bool = True, per_class: bool = False) -> None:
        self.spec = oof.spec
        self.per_class = per_class
        self.view = oof.view(volume, cut=cut and not per_class)  # per-class stats take whole volumes
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


def _class_gate(work: VolumeWork, c: int) -> np.ndarray | None:
    return None if work.view.gate is None else work.view.gate[:, c]


def _variants(work: VolumeWork, q: np.ndarray, params: list[ClassParams], vary: Vary) -> Iterator[Variant]:
    """Class ``vary.cls``'s mask for each candidate of ``vary`` (blend ``q`` for a step's candidates)."""
    c, volumetric = vary.cls, work.spec.volumetric
    if isinstance(vary, VaryWeights):
        class_probs = [np.ascontiguousarray(p[:, c]) for p in work.view.probs]
        return (
            (None, apply_class(blend_uint8(class_probs, w), _class_gate(work, c), params[c], volumetric))
            for w in vary.values
        )
    return class_variants(q[:, c], _class_gate(work, c), params[c], vary.step, vary.values, volumetric)


def variant_stats(
    work: VolumeWork, weight_list: list[np.ndarray], params: list[ClassParams], vary: Vary | None = None
) -> list[Any]:
    """The dataset's stats of one volume for every (weights, candidate) variant, weights-major."""
    volumetric = work.spec.volumetric
    out = []
    for weights in weight_list:
        q = work.blend(weights)
        if vary is None:
            out.append(work.stats(apply_postprocess(q, work.view.gate, params, volumetric)))
            continue
        mask = np.zeros(q.shape, dtype=bool)  # class vary.cls is set by each variant below
        for k, p in enumerate(params):
            if k != vary.cls:
                mask[:, k] = apply_class(q[:, k], _class_gate(work, k), p, volumetric)
        scored: dict[Hashable, Any] = {}
        for key, variant in _variants(work, q, params, vary):
            if variant is None:
                out.append(scored[key])
                continue
            mask[:, vary.cls] = variant
            out.append(work.stats(mask))
            if key is not None:
                scored[key] = out[-1]
    return out


def can_cut(params: list[ClassParams], vary: Vary | None = None) -> bool:
    """Whether every threshold in play keeps no voxel of probability 0 (so a volume may be cut to its box)."""
    steps = registry()
    levels = [t for p in params for step in steps for t in step.levels(p)]
    if isinstance(vary, VaryStep):
        step = steps.named(vary.step)
        levels += [t for v in vary.values for t in step.levels(step.set(params[vary.cls], v))]
    return min((prob_level(t) for t in levels), default=1) >= 1


@dataclass(frozen=True)
class Job:
    """Variants to score over some volumes: ``weight_list`` x the candidates of ``vary`` (see :func:`variant_stats`)."""

    volumes: frozenset[str]
    weight_list: list[np.ndarray]
    params: list[ClassParams]
    vary: Vary | None = None

    def key(self) -> tuple:
        """Equal keys score equal variants: a volume both jobs cover is scored once."""
        return (
            tuple(np.asarray(w, np.float64).tobytes() for w in self.weight_list),
            tuple(self.params),
            None if self.vary is None else self.vary.key(),
        )


def map_volumes(
    one: Callable[[str], T], volumes: Sequence[str], workers: int, desc: str, progress: bool = True
) -> list[T]:
    """``one(volume)`` for every volume, in order, over ``workers`` threads, with a progress bar."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(
            tqdm(pool.map(one, volumes), total=len(volumes), desc=desc, unit="vol", disable=not progress)
        )


def job_stats(
    oof: OOFSet,
    jobs: list[Job],
    *,
    per_class: bool = False,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[list[list[Any]]]:
    """Per job, per variant: the metric stats of each of the job's volumes (OOF order), in one pass.

    Jobs of several searches over overlapping volumes (a search on every volume and one on the
    tuning part) share the pass: a volume holds one view and one blend per weight vector, and jobs
    with equal settings are scored once on the volumes they share.
    """
    volumes = [v for v in oof.volumes if any(v in j.volumes for j in jobs)]
    keys = [j.key() for j in jobs]
    cut = all(can_cut(j.params, j.vary) for j in jobs)

    def one(volume: str) -> list[list[Any] | None]:
        work = VolumeWork(oof, volume, cut, per_class)
        done: dict[tuple, list[Any]] = {}
        out: list[list[Any] | None] = []
        for job, key in zip(jobs, keys):
            if volume not in job.volumes:
                out.append(None)
                continue
            if key not in done:
                done[key] = variant_stats(work, job.weight_list, job.params, job.vary)
            out.append(done[key])
        return out

    per_volume = map_volumes(one, volumes, workers, desc, progress)
    results = []
    for j in range(len(jobs)):
        rows = [r for r in (row[j] for row in per_volume) if r is not None]
        results.append([[r[i] for r in rows] for i in range(len(rows[0]))])
    return results


def evaluate_jobs(
    oof: OOFSet,
    jobs: list[Job],
    *,
    per_class: bool = False,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[list[dict]]:
    """Each job's score dicts (``spec.aggregate`` over its volumes), every volume read and blended once
    (see :func:`job_stats`)."""
    stats = job_stats(oof, jobs, per_class=per_class, workers=workers, desc=desc, progress=progress)
    return [[oof.spec.aggregate(variant) for variant in job] for job in stats]


def evaluate(
    oof: OOFSet,
    weight_list: list[np.ndarray],
    params: list[ClassParams],
    vary: Vary | None = None,
    *,
    volumes: list[str] | None = None,
    per_class: bool = False,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[dict]:
    """The dataset's score dict (``spec.aggregate``) of every variant over ``volumes`` (default: every OOF volume)."""
    job = Job(frozenset(oof.volumes if volumes is None else volumes), list(weight_list), list(params), vary)
    return evaluate_jobs(oof, [job], per_class=per_class, workers=workers, desc=desc, progress=progress)[0]


def evaluate_settings(
    oof: OOFSet,
    settings: list[Setting],
    volumes: list[str],
    *,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[dict]:
    """The score dict of each (weights, params) setting over ``volumes``, in one pass (repeats scored once)."""
    if not settings:
        return []
    volume_set = frozenset(volumes)
    jobs = [Job(volume_set, [np.asarray(w)], list(p)) for w, p in settings]
    results = evaluate_jobs(oof, jobs, workers=workers, desc=desc, progress=progress)
    return [r[0] for r in results]


def evaluate_pooled(
    oof: OOFSet,
    parts: list[tuple[list[Setting], list[str]]],
    *,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[dict]:
    """Cross-fitted scores: setting ``i`` of every part scored on that part's volumes, pooled into one dict.

    ``parts`` are ``(settings, volumes)`` with the same number of settings each (the same steps of
    searches tuned apart); score ``i`` aggregates the stats of every part's volumes under the part's
    own setting ``i``, so disjoint parts covering the OOF give every volume one held-apart score.
    """
    if not parts:
        return []
    n = len(parts[0][0])
    if any(len(settings) != n for settings, _ in parts):
        raise ValueError("every part of a pooled evaluation needs the same number of settings")
    jobs = [
        Job(frozenset(volumes), [np.asarray(w)], list(p)) for settings, volumes in parts for w, p in settings
    ]
    stats = job_stats(oof, jobs, workers=workers, desc=desc, progress=progress)
    return [oof.spec.aggregate([s for k in range(len(parts)) for s in stats[k * n + i][0]]) for i in range(n)]
