"""The coordinate-wise search of ``make tune`` over some OOF volumes (see :mod:`pipeline.infer.tune`).

:class:`Search` starts from the raw settings (the config's blend weights, threshold 0.5, every other
stage off), then tunes the blend, each post-processing stage class by class (:data:`STAGES` order),
further sweeps and the blend again, keeping a value unless a candidate scores strictly better, and
records the score and the settings after every step (:class:`Record`), so that another set of
volumes can score the same settings (the held-apart estimate).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EnsembleConfig, TuneCfg
from pipeline.infer.ensemble import OOFSet, start_weights
from pipeline.infer.evaluate import evaluate, metric_values
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
class Search:
    """A whole coordinate-wise search over some OOF days."""

    oof: OOFSet
    cfg: EnsembleConfig
    days: list[str]
    workers: int = 1
    progress: bool = True
    tag: str = ""  # prefix of progress bars and log lines
    records: list[Record] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_classes = len(self.oof.spec.classes)
        self.weights = np.tile(start_weights(self.cfg), (n_classes, 1))
        self.params = raw_params(n_classes)
        self.best: dict = {}

    def evaluate(self, weight_list: list[np.ndarray], vary: Any = None, desc: str = "") -> list[dict]:
        return evaluate(
            self.oof,
            weight_list,
            self.params,
            vary,
            days=self.days,
            workers=self.workers,
            desc=f"{self.tag}tune {desc}",
            progress=self.progress,
        )

    def record(self, step: str, label: str | None = None, skipped: str = "") -> None:
        label = label or STEP_LABELS[step]
        self.records.append(Record(step, label, self.best, self.weights.copy(), list(self.params), skipped))
        others = ", ".join(f"{k} {v:.4f}" for k, v in metric_values(self.best).items() if k != "score")
        note = f" [{skipped}]" if skipped else ""
        log.info("%s%-40s score %.5f (%s)%s", self.tag, label, self.best["score"], others, note)

    def run(self, warn_edges: bool = True) -> Search:
        classes = self.oof.spec.classes
        self.best = self.evaluate([self.weights], desc="raw")[0]
        self.record("raw")
        self.tune_blend("blend_raw")
        for sweep in range(1, max(1, self.cfg.tune.sweeps) + 1):
            before = list(self.params)
            for stage in STAGES:
                self.tune_stage(stage, sweep)
            if sweep > 1:
                name = "refine" if sweep == 2 else f"refine_{sweep}"
                self.record(name, f"+ per-class values re-tuned (sweep {sweep})")
            if self.params == before:
                for later in range(sweep + 1, max(1, self.cfg.tune.sweeps) + 1):
                    name = "refine" if later == 2 else f"refine_{later}"
                    self.record(name, f"+ per-class values re-tuned (sweep {later})", "converged")
                break
        if warn_edges:
            for c, cls in enumerate(classes):
                for stage in STAGES:
                    _warn_edge(cls, stage, self.params[c].setting(stage), stage_grid(stage, self.cfg.tune))
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

    def tune_stage(self, stage: str, sweep: int) -> None:
        """Class by class, every candidate of one stage; the first best (the current value on ties) kept."""
        classes = self.oof.spec.classes
        why = self.skip_reason(stage)
        grid = stage_grid(stage, self.cfg.tune)
        values = [_candidates(self.params[c].setting(stage), grid) for c in range(len(classes))]
        if not why and all(len(v) == 1 for v in values):
            why = "one value in the grid"
        if why:
            if sweep == 1:
                self.record(stage, skipped=why)
            return
        for c, cls in enumerate(classes):
            if len(values[c]) == 1:
                continue
            desc = f"{stage} {cls}" + (f" (sweep {sweep})" if sweep > 1 else "")
            results = self.evaluate([self.weights], (c, stage, values[c]), desc)
            pick = int(np.argmax([r["score"] for r in results]))
            self.params[c] = self.params[c].with_value(stage, values[c][pick])
            self.best = results[pick]
            self.curves.setdefault(stage, {})[cls] = _curve(values[c], results, values[c][pick])
            log.debug("%s%s %s = %s (score %.5f)", self.tag, cls, stage, values[c][pick], self.best["score"])
        if sweep == 1:
            self.record(stage)

    def tune_blend(self, step: str) -> None:
        """Grid-search the member weights over the simplex with the per-class settings held."""
        names = self.oof.member_names()
        if len(names) < 2:
            self.record(step, skipped="one member")
            return
        grid = simplex_grid(len(names), self.cfg.tune.blend_steps)
        curve: dict[str, Any] = {"members": names}
        if self.cfg.tune.per_class_blend:
            for c, cls in enumerate(self.oof.spec.classes):
                values = _candidates(self.weights[c], grid)
                results = self.evaluate([self.weights], (c, "weights", values), f"{step} {cls}")
                pick = int(np.argmax([r["score"] for r in results]))
                self.weights[c] = values[pick]
                self.best = results[pick]
                curve[cls] = _curve([v.tolist() for v in values], results, values[pick].tolist())
        else:
            values = _candidates(self.weights[0], grid)
            tiled = [np.tile(v, (len(self.weights), 1)) for v in values]
            results = self.evaluate(tiled, desc=step)
            pick = int(np.argmax([r["score"] for r in results]))
            self.weights = tiled[pick]
            self.best = results[pick]
            curve["all"] = _curve([v.tolist() for v in values], results, values[pick].tolist())
        self.curves[step] = curve
        label = (
            STEP_LABELS[step].replace("blend", "per-class blend") if self.cfg.tune.per_class_blend else None
        )
        self.record(step, label)


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
