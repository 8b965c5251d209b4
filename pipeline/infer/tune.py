"""Decide the ensemble's post-processing and blend on out-of-fold predictions (``make tune``).

The objective is the dataset's own metric (``DatasetSpec.volume_stats`` / ``aggregate``: for
UW-Madison 0.4 Dice + 0.6 (1 - 3D Hausdorff), for LGG the mean per-patient Dice, for the nerve
images the mean Dice with empty vs empty = 1) over every OOF volume. The search is coordinate-wise, each step starting from
the previous one's choice and keeping it unless a candidate scores strictly better:

1. raw: the members blended with the config's weights, cut at 0.5, nothing else;
2. member blend weights at those raw settings (``blend_raw``), a grid over the simplex in steps
   of ``1 / tune.blend_steps`` (skipped with one member);
3. pixel threshold, class by class (the other classes held);
4. classifier gate threshold, class by class (skipped without a classifier);
5. minimum component size (3D in a volume, 2D per image for 2D datasets), class by class;
6. up to ``tune.sweeps - 1`` more sweeps over 3-5 (``refine``), stopping when nothing moves: the
   first sweep picks the pixel threshold before any gate exists, so it tends to be too high
   (it does the gate's work), and the next sweep corrects it;
7. member blend weights again, with the per-class settings held (``blend``).

A pass evaluates every candidate of one (class, field) on a day while that day is in memory
(uint8 probabilities, memory-mapped), so each step reads the OOF once per class; days run on a
thread pool (the metric kernels release the GIL). Per-day results are
the dataset's per-volume stats, summed into the score by its ``aggregate``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import EnsembleConfig
from pipeline.infer.ensemble import OOFSet, blend_uint8, load_oof, start_weights
from pipeline.infer.postprocess import (
    ClassParams,
    Components,
    Decisions,
    apply_class,
    apply_postprocess,
    decisions_path,
    gate_slices,
    remove_small_components,
    threshold_probs,
    write_decisions,
)
from pipeline.runtime import available_cores

log = logging.getLogger(__name__)

RAW_THRESHOLD = 0.5  # the plain sigmoid cut: the "raw" reference every tuned step is measured against
FIELDS = ("pixel_threshold", "gate_threshold", "min_component_size")
STEP_LABELS = {
    "raw": "raw segmentation (threshold 0.5)",
    "blend_raw": "+ blend weights (at 0.5)",
    "pixel_threshold": "+ tuned pixel threshold",
    "gate_threshold": "+ classifier gate",
    "min_component_size": "+ small-component removal",
    "blend": "+ blend weights (re-tuned)",
}
Vary = tuple[int, str, list[float]]  # (class index, ClassParams field, candidate values)


def default_workers() -> int:
    """Worker threads for tuning and reports: the cores this process may use, at most 8."""
    return min(8, available_cores())


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


def _candidates(current: float, grid: tuple[float, ...]) -> list[float]:
    """The current value first (kept on ties), then the grid, without duplicates."""
    out: list[float] = []
    for v in (current, *grid):
        if all(abs(v - u) > 1e-9 for u in out):
            out.append(v)
    return out


def class_variants(
    probs_u8: np.ndarray,
    gate: np.ndarray | None,
    base: ClassParams,
    field: str,
    values: list[float],
    volumetric: bool = True,
) -> Iterator[np.ndarray]:
    """One class's (S, H, W) mask for each value of ``field`` (the other fields from ``base``).

    Shares work between candidates: the gate step thresholds once, the size step labels once.
    """
    if field == "pixel_threshold":
        for v in values:
            yield apply_class(probs_u8, gate, base.with_value(field, v), volumetric)
    elif field == "gate_threshold":
        cut = threshold_probs(probs_u8, base.pixel_threshold)
        for v in values:
            yield remove_small_components(
                gate_slices(cut.copy(), gate, v), base.min_component_size, volumetric
            )
    elif field == "min_component_size":
        mask = gate_slices(threshold_probs(probs_u8, base.pixel_threshold), gate, base.gate_threshold)
        components = Components.of(mask, volumetric)
        for v in values:
            yield mask if v <= 1 else components.keep(int(v))
    else:
        raise ValueError(f"unknown post-processing field '{field}' (expected one of {FIELDS})")


def day_stats(
    oof: OOFSet,
    day: str,
    weight_list: list[np.ndarray],
    params: list[ClassParams],
    vary: Vary | None = None,
    per_class: bool = False,
) -> list[Any]:
    """The dataset's stats of one volume for every (weights, candidate) variant, weights-major."""
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
        c, field, values = vary
        gate_c = None if gate is None else gate[:, c]
        for variant in class_variants(q[:, c], gate_c, params[c], field, values, spec.volumetric):
            mask[:, c] = variant
            out.append(stats(mask, truth))
    return out


def evaluate(
    oof: OOFSet,
    weight_list: list[np.ndarray],
    params: list[ClassParams],
    vary: Vary | None = None,
    *,
    per_class: bool = False,
    workers: int = 1,
    desc: str = "evaluate",
    progress: bool = True,
) -> list[dict]:
    """The dataset's score dict (``spec.aggregate``) of every variant over every OOF volume."""

    def one(day: str) -> list[Any]:
        return day_stats(oof, day, weight_list, params, vary, per_class)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        per_day = list(
            tqdm(pool.map(one, oof.days), total=len(oof.days), desc=desc, unit="day", disable=not progress)
        )
    n_variants = len(per_day[0])
    return [oof.spec.aggregate([stats[i] for stats in per_day]) for i in range(n_variants)]


def metric_values(result: dict) -> dict[str, float]:
    """The scalar figures of a metric dict (``score`` and the dataset's other means), no counts."""
    return {k: v for k, v in result.items() if isinstance(v, float)}


def _step(name: str, result: dict, previous: dict | None, label: str | None = None) -> dict:
    row = {
        "step": name,
        "label": label or STEP_LABELS[name],
        **metric_values(result),
        "gain": None if previous is None else result["score"] - previous["score"],
    }
    others = ", ".join(f"{k} {v:.4f}" for k, v in metric_values(result).items() if k != "score")
    log.info("%-28s score %.5f (%s)", row["label"], row["score"], others)
    return row


def _curve(values: list[float], results: list[dict], chosen: float) -> dict:
    order = np.argsort(values, kind="stable")
    keys = list(metric_values(results[0])) if results else ["score"]
    return {
        "values": [values[i] for i in order],
        **{k: [results[i][k] for i in order] for k in keys},
        "chosen": chosen,
    }


def _warn_edge(cls: str, field: str, chosen: float, grid: tuple[float, ...]) -> None:
    """Say so when the choice is the grid's largest value (or smallest threshold): the optimum may lie beyond."""
    if len(grid) < 2:
        return
    edges = {max(grid)} | ({min(grid)} if field == "pixel_threshold" else set())
    if any(abs(chosen - e) < 1e-9 for e in edges):
        log.warning(
            "%s %s = %s is at the edge of tune.%ss %s: the optimum may lie beyond; consider widening the grid",
            cls,
            field,
            chosen,
            field,
            list(grid),
        )


def _tune_blend(
    oof: OOFSet,
    cfg: EnsembleConfig,
    names: list[str],
    weights: np.ndarray,
    params: list[ClassParams],
    best: dict,
    steps: list[dict],
    curves: dict,
    step: str,
    **kw: Any,
) -> tuple[np.ndarray, dict]:
    """Grid-search the member weights over the simplex with the per-class settings held; append the step."""
    if len(names) < 2:
        steps.append({**_step(step, best, best), "skipped": "one member"})
        return weights, best
    grid = [weights] + [
        w for w in simplex_grid(len(names), cfg.tune.blend_steps) if not np.allclose(w, weights)
    ]
    results = evaluate(oof, grid, params, desc=f"tune {step}", **kw)
    pick = int(np.argmax([r["score"] for r in results]))  # first max: the current weights on ties
    curves[step] = {
        "members": names,
        "weights": [g.tolist() for g in grid],
        "score": [r["score"] for r in results],
    }
    steps.append(_step(step, results[pick], steps[-1]))
    return grid[pick], results[pick]


def tune_ensemble(
    cfg: EnsembleConfig, root: Path, *, workers: int | None = None, progress: bool = True
) -> Decisions:
    """Run the coordinate-wise search on the OOF of ``cfg``'s members and return the decisions."""
    workers = workers or default_workers()
    oof = load_oof(cfg, root, progress)
    names = [m.name for m in oof.members]
    weights = start_weights(cfg)
    classes = oof.spec.classes
    params = raw_params(len(classes))
    kw = {"workers": workers, "progress": progress}

    best = evaluate(oof, [weights], params, desc="tune raw", **kw)[0]
    steps = [_step("raw", best, None)]
    curves: dict = {}
    # blend first at the raw settings, so the per-class search runs on the blend it will be used with;
    # the blend is tuned again once the per-class settings are known
    weights, best = _tune_blend(oof, cfg, names, weights, params, best, steps, curves, "blend_raw", **kw)
    grids = {
        "pixel_threshold": cfg.tune.pixel_thresholds,
        "gate_threshold": cfg.tune.gate_thresholds,
        "min_component_size": cfg.tune.min_component_sizes,
    }
    for sweep in range(1, max(1, cfg.tune.sweeps) + 1):
        before = list(params)
        for field in FIELDS:
            if field == "gate_threshold" and oof.gates is None:
                if sweep == 1:
                    log.info("no classifier in '%s': the gate step is skipped (gate threshold 0)", cfg.name)
                    steps.append({**_step(field, best, best), "skipped": "no classifier"})
                continue
            curves[field] = {}  # the last sweep's curves: they pass through the final choice
            for c, cls in enumerate(classes):
                values = _candidates(getattr(params[c], field), grids[field])
                desc = f"tune {field} {cls}" + (f" (sweep {sweep})" if sweep > 1 else "")
                results = evaluate(oof, [weights], params, (c, field, values), desc=desc, **kw)
                pick = int(np.argmax([r["score"] for r in results]))  # first max: the current value on ties
                params[c] = params[c].with_value(field, values[pick])
                best = results[pick]
                curves[field][cls] = _curve(values, results, values[pick])
                log.info("%s %s = %s (score %.5f)", cls, field, values[pick], best["score"])
            if sweep == 1:
                steps.append(_step(field, best, steps[-1]))
        if sweep > 1:
            steps.append(
                _step("refine", best, steps[-1], label=f"+ per-class values re-tuned (sweep {sweep})")
            )
        if params == before:
            break
    for c, cls in enumerate(classes):
        for field in FIELDS:
            if field != "gate_threshold" or oof.gates is not None:
                _warn_edge(cls, field, getattr(params[c], field), grids[field])

    weights, best = _tune_blend(oof, cfg, names, weights, params, best, steps, curves, "blend", **kw)
    final = evaluate(oof, [weights], params, per_class=True, desc="final OOF", **kw)[0]
    per_class = {cls: {**final["per_class"][cls], **asdict(params[c])} for c, cls in enumerate(classes)}
    return Decisions(
        classes=dict(zip(classes, params)),
        weights={name: float(w) for name, w in zip(names, weights)},
        members=[{"config": m.name, "folds": m.folds} for m in oof.members],
        classifier=oof.classifier,
        ensemble=cfg.name,
        steps=steps,
        per_class=per_class,
        curves=curves,
        oof={
            "days": len(oof.days),
            "slices": oof.n_slices,
            **metric_values(final),
            "grids": {k: list(v) for k, v in grids.items()}
            | {"blend_steps": cfg.tune.blend_steps, "sweeps": cfg.tune.sweeps},
        },
        dataset=oof.spec.name,
        volumetric=oof.spec.volumetric,
    )


def run_tune(cfg: EnsembleConfig, root: Path, *, workers: int | None = None, progress: bool = True) -> Path:
    """Tune on OOF and write ``runs/ensemble/<cfg>/postprocess.json`` (atomically)."""
    decisions = tune_ensemble(cfg, root, workers=workers, progress=progress)
    return write_decisions(decisions_path(cfg.name), decisions)
