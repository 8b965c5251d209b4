"""The coordinate-wise search of ``make tune`` over sets of OOF volumes (see :mod:`pipeline.infer.tune`).

Each :class:`Track` starts from the raw settings (the config's blend weights, threshold 0.5, every
other stage off), then tunes the blend, each post-processing stage class by class (:data:`STAGES`
order), further sweeps and the blend again, keeping a value unless a candidate scores strictly
better, and records the score and the settings after every step (:class:`Record`), so that another
set of volumes can score the same settings (the held-apart estimate). :class:`Search` runs its
tracks (every volume; the tuning part) in lockstep, sharing each pass over the days.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EnsembleConfig, TuneCfg
from pipeline.infer.ensemble import OOFSet, start_weights
from pipeline.infer.evaluate import Job, evaluate_jobs, metric_values
from pipeline.infer.postprocess import STAGES, ClassParams

log = logging.getLogger(__name__)

RAW_THRESHOLD = 0.5  # the plain sigmoid cut: the "raw" reference every tuned step is measured against
OFF = {"prob_gate": (0, 0.0), "z_run": 0}  # the "off" value of the optional stages, always a candidate
STEP_LABELS = {
    "raw": "raw segmentation (threshold 0.5)",
    "blend_raw": "+ blend weights (at 0.5)",
    "pixel_threshold": "+ tuned pixel threshold",
    "gate_threshold": "+ classifier gate",
    "prob_gate": "+ probability gate (> N pixels at p >= t)",
    "z_run": "+ z-continuity (k consecutive slices)",
    "min_component_size": "+ small-component removal",
    "blend": "+ blend weights (re-tuned)",
}


def raw_params(n_classes: int) -> list[ClassParams]:
    return [ClassParams(RAW_THRESHOLD, 0.0, 0) for _ in range(n_classes)]


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


def stage_grid(stage: str, tune: TuneCfg) -> list[Any]:
    """The candidate values of one stage from the config (the optional stages with "off" first)."""
    if stage == "prob_gate":
        on = [(int(n), float(t)) for n in tune.prob_gate_pixels if n > 0 for t in tune.prob_gate_levels]
        return [OFF[stage], *on]
    if stage == "z_run":
        return [OFF[stage], *(int(k) for k in tune.z_runs if k > 1)]
    return list(getattr(tune, f"{stage}s"))


@dataclass
class Record:
    """One step of a search: its score on the searched days and the settings it left."""

    step: str
    label: str
    result: dict
    weights: np.ndarray  # (classes, members)
    params: list[ClassParams]
    skipped: str = ""


@dataclass
class Track:
    """One coordinate-wise search over some OOF days: its settings so far, its records and curves."""

    days: list[str]
    weights: np.ndarray  # (classes, members)
    params: list[ClassParams]
    tag: str = ""  # prefix of log lines
    best: dict = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    converged: bool = False

    def record(self, step: str, label: str | None = None, skipped: str = "") -> None:
        label = label or STEP_LABELS[step]
        self.records.append(Record(step, label, self.best, self.weights.copy(), list(self.params), skipped))
        others = ", ".join(f"{k} {v:.4f}" for k, v in metric_values(self.best).items() if k != "score")
        note = f" [{skipped}]" if skipped else ""
        log.info("%s%-40s score %.5f (%s)%s", self.tag, label, self.best["score"], others, note)


@dataclass
class Search:
    """Coordinate-wise searches over sets of OOF days, run in lockstep (one :class:`Track` each).

    Every step evaluates the candidates of all tracks in the same passes over the days
    (:func:`~pipeline.infer.evaluate.evaluate_jobs`); each track still chooses on its own days from
    its own settings, exactly as if it ran alone.
    """

    oof: OOFSet
    cfg: EnsembleConfig
    day_sets: list[tuple[str, list[str]]]  # (log tag, days) per track
    workers: int = 1
    progress: bool = True
    fixed: np.ndarray | None = None  # (classes, members) weights held throughout (no blend step)
    tracks: list[Track] = field(default_factory=list)

    def __post_init__(self) -> None:
        n_classes = len(self.oof.spec.classes)
        start = np.tile(start_weights(self.cfg), (n_classes, 1)) if self.fixed is None else self.fixed
        self.tracks = [
            Track(list(days), start.copy(), raw_params(n_classes), tag) for tag, days in self.day_sets
        ]

    def evaluate(self, jobs: list[tuple[Track, list[np.ndarray], Any]], desc: str) -> list[list[dict]]:
        """Score ``(track, weight list, vary)`` jobs in one pass; one result list per job."""
        if not jobs:
            return []
        return evaluate_jobs(
            self.oof,
            [Job(frozenset(t.days), w, list(t.params), vary) for t, w, vary in jobs],
            workers=self.workers,
            desc=f"tune {desc}",
            progress=self.progress,
        )

    def run(self, warn_edges: bool = True) -> Search:
        classes = self.oof.spec.classes
        for track, result in zip(
            self.tracks, self.evaluate([(t, [t.weights], None) for t in self.tracks], "raw")
        ):
            track.best = result[0]
            track.record("raw")
        self.tune_blend("blend_raw")
        n_sweeps = max(1, self.cfg.tune.sweeps)
        for sweep in range(1, n_sweeps + 1):
            active = [t for t in self.tracks if not t.converged]
            if not active:
                break
            before = [list(t.params) for t in active]
            for stage in STAGES:
                self.tune_stage(stage, sweep, active)
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
            for c, cls in enumerate(classes):
                for stage in STAGES:
                    grid = stage_grid(stage, self.cfg.tune)
                    _warn_edge(cls, stage, self.tracks[0].params[c].setting(stage), grid)
        self.tune_blend("blend")
        return self

    def skip_reason(self, stage: str) -> str:
        if stage == "gate_threshold" and self.oof.gates is None:
            return "no classifier"
        if stage == "z_run" and not self.oof.spec.volumetric:
            if any(k > 1 for k in self.cfg.tune.z_runs):
                log.warning("tune.z_runs %s ignored: the images are 2D", list(self.cfg.tune.z_runs))
            return "2D images"
        return ""

    def tune_stage(self, stage: str, sweep: int, tracks: list[Track]) -> None:
        """Class by class, every candidate of one stage; the first best (the current value on ties) kept."""
        classes = self.oof.spec.classes
        why = self.skip_reason(stage)
        grid = stage_grid(stage, self.cfg.tune)
        values = {
            id(t): [_candidates(t.params[c].setting(stage), grid) for c in range(len(classes))]
            for t in tracks
        }
        skipped = {}
        for t in tracks:
            skipped[id(t)] = why or (
                "one value in the grid" if all(len(v) == 1 for v in values[id(t)]) else ""
            )
            if skipped[id(t)] and sweep == 1:
                t.record(stage, skipped=skipped[id(t)])
        live = [t for t in tracks if not skipped[id(t)]]
        for c, cls in enumerate(classes):
            jobs = [(t, [t.weights], (c, stage, values[id(t)][c])) for t in live if len(values[id(t)][c]) > 1]
            desc = f"{stage} {cls}" + (f" (sweep {sweep})" if sweep > 1 else "")
            for (t, _, (_, _, vals)), results in zip(jobs, self.evaluate(jobs, desc)):
                pick = int(np.argmax([r["score"] for r in results]))
                t.params[c] = t.params[c].with_value(stage, vals[pick])
                t.best = results[pick]
                t.curves.setdefault(stage, {})[cls] = _curve(vals, results, vals[pick])
                log.debug("%s%s %s = %s (score %.5f)", t.tag, cls, stage, vals[pick], t.best["score"])
        if sweep == 1:
            for t in live:
                t.record(stage)

    def tune_blend(self, step: str) -> None:
        """Grid-search the member weights over the simplex with the per-class settings held."""
        names = self.oof.member_names()
        if len(names) < 2 or self.fixed is not None:
            for t in self.tracks:
                t.record(step, skipped="one member" if len(names) < 2 else "weights held (blend guard)")
            return
        grid = simplex_grid(len(names), self.cfg.tune.blend_steps)
        curves: dict[int, dict[str, Any]] = {id(t): {"members": names} for t in self.tracks}
        if self.cfg.tune.per_class_blend:
            for c, cls in enumerate(self.oof.spec.classes):
                jobs = [
                    (t, [t.weights], (c, "weights", _candidates(t.weights[c], grid))) for t in self.tracks
                ]
                for (t, _, (_, _, vals)), results in zip(jobs, self.evaluate(jobs, f"{step} {cls}")):
                    pick = int(np.argmax([r["score"] for r in results]))
                    t.weights[c] = vals[pick]
                    t.best = results[pick]
                    curves[id(t)][cls] = _curve([v.tolist() for v in vals], results, vals[pick].tolist())
        else:
            tiled = {
                id(t): [np.tile(v, (len(t.weights), 1)) for v in _candidates(t.weights[0], grid)]
                for t in self.tracks
            }
            jobs = [(t, tiled[id(t)], None) for t in self.tracks]
            for (t, cands, _), results in zip(jobs, self.evaluate(jobs, step)):
                pick = int(np.argmax([r["score"] for r in results]))
                t.weights = cands[pick].copy()
                t.best = results[pick]
                curves[id(t)]["all"] = _curve(
                    [v[0].tolist() for v in cands], results, cands[pick][0].tolist()
                )
        label = (
            STEP_LABELS[step].replace("blend", "per-class blend") if self.cfg.tune.per_class_blend else None
        )
        for t in self.tracks:
            t.curves[step] = curves[id(t)]
            t.record(step, label)


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


def _warn_edge(cls: str, stage: str, chosen: Any, grid: list[Any]) -> None:
    """Say so when the choice is the grid's largest value (or smallest threshold): the optimum may lie beyond."""
    first = [float(np.atleast_1d(g)[0]) for g in grid]  # N of the probability gate
    value = np.atleast_1d(chosen)[0]
    if len(set(first)) < 2 or (stage in OFF and value == 0):
        return
    edges = {max(first)} | ({min(first)} if stage == "pixel_threshold" else set())
    if any(abs(value - e) < 1e-9 for e in edges):
        log.warning(
            "%s %s = %s is at the edge of its tune grid %s: the optimum may lie beyond; consider widening it",
            cls,
            stage,
            chosen,
            [f"{v:g}" for v in sorted(set(first))],
        )
