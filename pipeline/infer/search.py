"""The coordinate-wise search of ``make tune`` over sets of OOF volumes (see :mod:`pipeline.infer.tune`).

Each :class:`Track` starts from the raw settings (the config's blend weights, every step at its
``start``: threshold 0.5, every other step off), then tunes the blend, each post-processing step
class by class (:mod:`pipeline.infer.steps` order), further sweeps and the blend again, keeping a
value unless a candidate scores strictly better, and records the score and the settings after
every step (:class:`Record`), so that another set of volumes can score the same settings (the
held-apart estimate). :class:`Search` runs its tracks (every volume; the tuning part) in lockstep,
sharing each pass over the volumes.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EnsembleConfig
from pipeline.infer.ensemble import OOFSet, start_weights
from pipeline.infer.evaluate import Job, Vary, VaryStep, VaryWeights, evaluate_jobs, metric_values
from pipeline.infer.step_base import ClassParams, Step, StepValue
from pipeline.infer.steps import registry

log = logging.getLogger(__name__)

SEARCH_LABELS = {  # the rows that are not post-processing steps (those carry their own label)
    "raw": "raw segmentation (threshold 0.5)",
    "blend_raw": "+ blend weights (at 0.5)",
    "blend": "+ blend weights (re-tuned)",
}


def step_label(step: str) -> str:
    """The table label of a search row: raw, blend or a registered step."""
    return SEARCH_LABELS.get(step) or registry().named(step).label


def raw_params(n_classes: int) -> list[ClassParams]:
    """The settings every search starts from, per class: each step at its ``start`` value."""
    return [registry().raw() for _ in range(n_classes)]


def simplex_grid(n: int, steps: int) -> list[np.ndarray]:
    """Every weight vector of ``n`` non-negative multiples of ``1/steps`` summing to 1."""
    steps = max(1, steps)
    out = []
    for cuts in itertools.combinations(range(steps + n - 1), n - 1):
        parts = np.diff([-1, *cuts, steps + n - 1]) - 1
        out.append(parts / steps)
    return out


def _same(a: Any, b: Any) -> bool:
    return np.allclose(np.atleast_1d(a), np.atleast_1d(b), rtol=0.0, atol=1e-9)


def _candidates(current: Any, grid: Any) -> list[Any]:
    """The current value first (kept on ties), then the grid, without duplicates."""
    out: list[Any] = []
    for v in (current, *grid):
        if not any(_same(v, u) for u in out):
            out.append(v)
    return out


@dataclass
class Record:
    """One step of a search: its score on the searched volumes and the settings it left."""

    step: str
    label: str
    result: dict
    weights: np.ndarray  # (classes, members)
    params: list[ClassParams]
    skipped: str = ""


@dataclass
class Track:
    """One coordinate-wise search over some OOF volumes: its settings so far, its records and curves."""

    volumes: list[str]
    weights: np.ndarray  # (classes, members)
    params: list[ClassParams]
    tag: str = ""  # prefix of log lines
    best: dict = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    converged: bool = False

    def record(self, step: str, label: str | None = None, skipped: str = "") -> None:
        label = label or step_label(step)
        self.records.append(Record(step, label, self.best, self.weights.copy(), list(self.params), skipped))
        others = ", ".join(f"{k} {v:.4f}" for k, v in metric_values(self.best).items() if k != "score")
        note = f" [{skipped}]" if skipped else ""
        log.info("%s%-40s score %.5f (%s)%s", self.tag, label, self.best["score"], others, note)

    def pick(self, results: list[dict], min_gain: float = 0.0) -> int:
        """The first best candidate; its result becomes ``best``.

        The current value (tried first) is kept on ties, and unless the best beats it by more than
        ``min_gain`` (``tune.min_gain``: shrinkage towards the defaults on small, noisy OOF).
        """
        scores = [r["score"] for r in results]
        i = int(np.argmax(scores))
        if scores[i] - scores[0] <= min_gain:
            i = 0
        self.best = results[i]
        return i


TrackJob = tuple[Track, list[np.ndarray], Vary | None]  # (track, weight list, what varies)


@dataclass
class Search:
    """Coordinate-wise searches over sets of OOF volumes, run in lockstep (one :class:`Track` each).

    Every step evaluates the candidates of all tracks in the same passes over the volumes
    (:func:`~pipeline.infer.evaluate.evaluate_jobs`); each track still chooses on its own volumes
    from its own settings, exactly as if it ran alone.
    """

    oof: OOFSet
    cfg: EnsembleConfig
    volume_sets: list[tuple[str, list[str]]]  # (log tag, volumes) per track
    workers: int = 1
    progress: bool = True
    fixed: np.ndarray | None = None  # (classes, members) weights held throughout (no blend step)
    tracks: list[Track] = field(default_factory=list)

    def __post_init__(self) -> None:
        n_classes = len(self.oof.spec.classes)
        start = np.tile(start_weights(self.cfg.members), (n_classes, 1)) if self.fixed is None else self.fixed
        self.tracks = [
            Track(list(volumes), start.copy(), raw_params(n_classes), tag)
            for tag, volumes in self.volume_sets
        ]

    def evaluate(self, jobs: list[TrackJob], desc: str) -> list[list[dict]]:
        """Score ``(track, weight list, vary)`` jobs in one pass; one result list per job."""
        if not jobs:
            return []
        return evaluate_jobs(
            self.oof,
            [Job(frozenset(t.volumes), w, list(t.params), vary) for t, w, vary in jobs],
            workers=self.workers,
            desc=f"tune {desc}",
            progress=self.progress,
        )

    def run(self, warn_edges: bool = True) -> Search:
        raw_jobs: list[TrackJob] = [(t, [t.weights], None) for t in self.tracks]
        for track, result in zip(self.tracks, self.evaluate(raw_jobs, "raw")):
            track.best = result[0]
            track.record("raw")
        self.tune_blend("blend_raw")
        n_sweeps = max(1, self.cfg.tune.sweeps)
        for sweep in range(1, n_sweeps + 1):
            active = [t for t in self.tracks if not t.converged]
            if not active:
                break
            before = [list(t.params) for t in active]
            for step in registry():
                self.tune_step(step, sweep, active)
            for track, old in zip(active, before):
                if sweep > 1:
                    track.record(_refine(sweep), f"+ per-class values re-tuned (sweep {sweep})")
                if track.params == old:
                    track.converged = True
                    for later in range(sweep + 1, n_sweeps + 1):
                        track.record(
                            _refine(later), f"+ per-class values re-tuned (sweep {later})", "converged"
                        )
        if warn_edges:
            self.warn_edges()
        self.tune_blend("blend")
        return self

    def warn_edges(self) -> None:
        steps = registry()
        for c, cls in enumerate(self.oof.spec.classes):
            for step in steps:
                grid = steps.candidates(step, self.cfg.tune)
                _warn_edge(cls, step, step.get(self.tracks[0].params[c]), grid)

    def skip_reason(self, step: Step) -> str:
        if step.needs_classifier and self.oof.gates is None:
            return "no classifier"
        if step.volumetric_only and not self.oof.spec.volumetric:
            if len(registry().candidates(step, self.cfg.tune)) > 1:
                key = step.grid_keys[0]
                log.warning("tune.%s %s ignored: the images are 2D", key, list(getattr(self.cfg.tune, key)))
            return "2D images"
        return ""

    def tune_step(self, step: Step, sweep: int, tracks: list[Track]) -> None:
        """Class by class, every candidate of one step; the first best (the current value on ties) kept."""
        classes = self.oof.spec.classes
        why = self.skip_reason(step)
        grid = registry().candidates(step, self.cfg.tune)
        values = {
            id(t): [_candidates(step.get(t.params[c]), grid) for c in range(len(classes))] for t in tracks
        }
        skipped = {}
        for t in tracks:
            skipped[id(t)] = why or (
                "one value in the grid" if all(len(v) == 1 for v in values[id(t)]) else ""
            )
            if skipped[id(t)] and sweep == 1:
                t.record(step.name, skipped=skipped[id(t)])
        live = [t for t in tracks if not skipped[id(t)]]
        for c, cls in enumerate(classes):
            jobs: list[TrackJob] = [
                (t, [t.weights], VaryStep(c, step.name, values[id(t)][c]))
                for t in live
                if len(values[id(t)][c]) > 1
            ]
            desc = f"{step.name} {cls}" + (f" (sweep {sweep})" if sweep > 1 else "")
            for (t, _, _), results in zip(jobs, self.evaluate(jobs, desc)):
                vals = values[id(t)][c]
                pick = t.pick(results, self.cfg.tune.min_gain)
                t.params[c] = step.set(t.params[c], vals[pick])
                t.curves.setdefault(step.name, {})[cls] = _curve(vals, results, vals[pick])
                log.debug("%s%s %s = %s (score %.5f)", t.tag, cls, step.name, vals[pick], t.best["score"])
        if sweep == 1:
            for t in live:
                t.record(step.name)

    def tune_blend(self, row: str) -> None:
        """Grid-search the member weights over the simplex with the per-class settings held."""
        names = self.oof.member_names()
        if len(names) < 2 or self.fixed is not None:
            for t in self.tracks:
                t.record(row, skipped="one member" if len(names) < 2 else "weights held (blend guard)")
            return
        grid = simplex_grid(len(names), self.cfg.tune.blend_steps)
        curves: dict[int, dict[str, Any]] = {id(t): {"members": names} for t in self.tracks}
        if self.cfg.tune.per_class_blend:
            self._blend_per_class(row, grid, curves)
        else:
            self._blend_shared(row, grid, curves)
        label = step_label(row).replace("blend", "per-class blend") if self.cfg.tune.per_class_blend else None
        for t in self.tracks:
            t.curves[row] = curves[id(t)]
            t.record(row, label)

    def _blend_per_class(self, row: str, grid: list[np.ndarray], curves: dict[int, dict[str, Any]]) -> None:
        for c, cls in enumerate(self.oof.spec.classes):
            cands = {id(t): _candidates(t.weights[c], grid) for t in self.tracks}
            jobs: list[TrackJob] = [(t, [t.weights], VaryWeights(c, cands[id(t)])) for t in self.tracks]
            for (t, _, _), results in zip(jobs, self.evaluate(jobs, f"{row} {cls}")):
                vals = cands[id(t)]
                pick = t.pick(results, self.cfg.tune.min_gain)
                t.weights[c] = vals[pick]
                curves[id(t)][cls] = _curve([v.tolist() for v in vals], results, vals[pick].tolist())

    def _blend_shared(self, row: str, grid: list[np.ndarray], curves: dict[int, dict[str, Any]]) -> None:
        tiled = {
            id(t): [np.tile(v, (len(t.weights), 1)) for v in _candidates(t.weights[0], grid)]
            for t in self.tracks
        }
        jobs: list[TrackJob] = [(t, tiled[id(t)], None) for t in self.tracks]
        for (t, cands, _), results in zip(jobs, self.evaluate(jobs, row)):
            pick = t.pick(results, self.cfg.tune.min_gain)
            t.weights = cands[pick].copy()
            curves[id(t)]["all"] = _curve([v[0].tolist() for v in cands], results, cands[pick][0].tolist())


def _refine(sweep: int) -> str:
    return "refine" if sweep == 2 else f"refine_{sweep}"


def _curve(values: list[Any], results: list[dict], chosen: Any) -> dict:
    """Scores against candidate values (sorted), with the chosen one; values may be pairs or vectors."""
    keys = list(metric_values(results[0])) if results else ["score"]
    order = sorted(range(len(values)), key=lambda i: np.atleast_1d(values[i]).tolist())
    plain = [list(v) if isinstance(v, tuple) else v for v in values]
    return {
        "values": [plain[i] for i in order],
        **{k: [results[i][k] for i in order] for k in keys},
        "chosen": list(chosen) if isinstance(chosen, tuple) else chosen,
    }


def _warn_edge(cls: str, step: Step, chosen: StepValue, grid: list[StepValue]) -> None:
    """Say so when the choice is the grid's largest value (or smallest, for ``low_edge`` steps): the
    optimum may lie beyond."""
    first = [float(np.atleast_1d(g)[0]) for g in grid]  # N of the probability gate
    value = np.atleast_1d(chosen)[0]
    if len(set(first)) < 2 or (step.off is not None and value == 0):
        return
    edges = {max(first)} | ({min(first)} if step.low_edge else set())
    if any(abs(value - e) < 1e-9 for e in edges):
        log.warning(
            "%s %s = %s is at the edge of its tune grid %s: the optimum may lie beyond; consider widening it",
            cls,
            step.name,
            chosen,
            [f"{v:g}" for v in sorted(set(first))],
        )
